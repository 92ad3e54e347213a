#!/bin/sh
# Build the C core with the host backend and run every tests/c/test_*.c
# (each its own program) under AddressSanitizer + UndefinedBehaviorSanitizer;
# with the argument `valgrind`, also run unsanitized builds under valgrind
# memcheck. The core is every cmetal/*.c but pycapsule.c, which needs
# Python.h and is built only into the extension.
#   tests/c/run.sh            sanitizers only
#   tests/c/run.sh valgrind   sanitizers, then valgrind
# CC overrides the compiler (default gcc).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${TMPDIR:-/tmp}/mlxbuf-ctest.$$
mkdir -p "$out"
trap 'rm -rf "$out"' EXIT INT TERM
cc=${CC:-gcc}
core=
for f in "$root"/cmetal/*.c; do
    case $f in
    */pycapsule.c) ;;
    *) core="$core $f" ;;
    esac
done
warn="-std=c11 -Wall -Wextra -Werror"

for test in "$here"/test_*.c; do
    name=$(basename "$test" .c)
    echo "== $name: build ($cc, ASan + UBSan)"
    # shellcheck disable=SC2086
    $cc $warn -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
        -fno-sanitize-recover=undefined -pthread -I"$root/cmetal" $core "$test" -o "$out/$name.asan"
    echo "== $name: run (ASan + UBSan)"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$out/$name.asan"

    if [ "${1:-}" = "valgrind" ]; then
        echo "== $name: build ($cc, for valgrind)"
        # shellcheck disable=SC2086
        $cc $warn -g -O1 -pthread -I"$root/cmetal" $core "$test" -o "$out/$name.plain"
        echo "== $name: run (valgrind memcheck)"
        valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
            "$out/$name.plain"
    fi
done
echo "== C core tests passed"
