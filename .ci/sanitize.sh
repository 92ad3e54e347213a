#!/usr/bin/env bash
# The sanitizer passes (issue 7):
#  1. the C core alone (tests/c) under ASan+UBSan, then under valgrind;
#  2. mlxbuf._cmetal built with -fsanitize=address,undefined in a scratch
#     copy of the tree; a canary proves LeakSanitizer still reports a leak
#     made by our C code through the suppressions; then the whole pytest
#     suite runs against that build with leak detection on;
#  3. valgrind memcheck over `python -m mlxbuf` on the normal build.
# The work tree's own build is left untouched.
# Usage: .ci/sanitize.sh [python]    (default: the python on PATH)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The real interpreter binary: LD_PRELOAD must reach python itself, not a
# pyenv shim script (whose bash would be "leak-checked" instead).
py=$("${1:-python}" -c 'import sys; print(sys.executable)')
step() { printf '\n==== %s ====\n' "$*"; }

step "C core under ASan/UBSan and valgrind (tests/c/run.sh)"
sh tests/c/run.sh valgrind

step "sanitizer build of mlxbuf._cmetal (scratch copy)"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude='*.so' \
    --exclude=./build --exclude='__pycache__' -cf - . | tar -C "$scratch" -xf -
(cd "$scratch" && MLXBUF_SANITIZE=address,undefined "$py" build_ffi.py)

# gcc's runtimes, preloaded because the interpreter is not instrumented.
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
for lib in $preload; do
    [ -f "$lib" ] || { echo "gcc's sanitizer runtime $lib is missing (Debian: libgcc-NN-dev)"; exit 1; }
done
san_env=(
    env "LD_PRELOAD=$preload"
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_init_order=1"
    "LSAN_OPTIONS=suppressions=$root/tests/sanitizer/lsan.supp:print_suppressions=0"
    "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1"
)

step "canary: a leak made by cmetal/ must still be reported"
set +e
canary=$(cd "$scratch" && "${san_env[@]}" "$py" -c '
import mlxbuf
from mlxbuf._cmetal import lib
buf = mlxbuf.Device("host").alloc_buffer(4096, "u8", (4096,))
lib.cm_storage_retain(buf._storage)   # one reference nobody will drop
' 2>&1)
status=$?
set -e
if [ "$status" -eq 0 ] || ! grep -q "cm__storage_new" <<<"$canary"; then
    echo "LeakSanitizer did not report the deliberate leak (exit $status):"
    echo "$canary"
    exit 1
fi
echo "reported as expected (exit $status): $(grep -m1 'Direct leak' <<<"$canary")"

step "pytest under ASan/UBSan, leak detection on"
# The type-check and build tests run external compilers, which must not
# inherit the preloaded runtimes; they ran in the plain pass.
(cd "$scratch" && "${san_env[@]}" MLXBUF_SANITIZER_RUN=1 "$py" -m pytest -q -p no:cacheprovider \
    --deselect tests/test_metal_typecheck.py --deselect tests/test_build.py tests)

step "valgrind memcheck of python -m mlxbuf"
bash "$root/.ci/valgrind.sh" "$py"
