#!/bin/sh
# Build the C core with the host backend and run tests/c/test_core.c under
# AddressSanitizer + UndefinedBehaviorSanitizer; with the argument
# `valgrind`, also run an unsanitized build under valgrind memcheck.
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
src="$root/cmetal/error.c $root/cmetal/core.c $root/cmetal/pool.c $root/cmetal/host.c $here/test_core.c"
warn="-std=c11 -Wall -Wextra -Werror"

echo "== build ($cc, ASan + UBSan)"
# shellcheck disable=SC2086
$cc $warn -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
    -fno-sanitize-recover=undefined -pthread -I"$root/cmetal" $src -o "$out/test_asan"
echo "== run (ASan + UBSan)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$out/test_asan"

if [ "${1:-}" = "valgrind" ]; then
    echo "== build ($cc, for valgrind)"
    # shellcheck disable=SC2086
    $cc $warn -g -O1 -pthread -I"$root/cmetal" $src -o "$out/test_plain"
    echo "== run (valgrind memcheck)"
    valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
        "$out/test_plain"
fi
echo "== C core tests passed"
