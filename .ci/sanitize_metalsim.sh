#!/usr/bin/env bash
# The sanitizer pass of the simulator variant (Linux): mlxbuf._cmetal built
# with MLXBUF_METAL_SIM=1 and -fsanitize=address,undefined (clang-19, whose
# runtime is preloaded because the interpreter is not instrumented) in a
# scratch copy of the tree, so cmetal/metal.m, the C core and the simulated
# Metal all run instrumented;
#  1. a canary proves LeakSanitizer still reports a leak made by our C code
#     on the simulated device through the suppressions;
#  2. the whole suite runs against that build on the simulated Metal with
#     leak detection on (as .ci/sanitize.sh does for the host build).
# The work tree's own build is left untouched.
# Usage: .ci/sanitize_metalsim.sh [python]    (default: the python on PATH)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=$("${1:-python}" -c 'import sys; print(sys.executable)')
clang=${CLANG:-clang-19}
step() { printf '\n==== %s ====\n' "$*"; }

step "ASan/UBSan build of the simulator variant (scratch copy)"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tar -C "$root" --exclude=./.git --exclude='./.venv*' --exclude='*.so' \
    --exclude=./build --exclude='__pycache__' -cf - . | tar -C "$scratch" -xf -
(cd "$scratch" && MLXBUF_METAL_SIM=1 MLXBUF_SANITIZE=address,undefined "$py" build_ffi.py)

# clang's shared runtime carries ASan and UBSan together.
runtime=$("$clang" -print-file-name=libclang_rt.asan-x86_64.so)
[ -f "$runtime" ] || { echo "clang's sanitizer runtime $runtime is missing (Debian: libclang-rt-19-dev)"; exit 1; }
san_env=(
    env "LD_PRELOAD=$runtime"
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_init_order=1"
    "LSAN_OPTIONS=suppressions=$root/tests/sanitizer/lsan.supp:print_suppressions=0"
    "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1"
)

step "canary: a leak made by cmetal/ on the simulated device must still be reported"
set +e
canary=$(cd "$scratch" && "${san_env[@]}" "$py" -c '
import mlxbuf
from mlxbuf._cmetal import lib
buf = mlxbuf.Device("metal").alloc_buffer(4096, "u8", (4096,))
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

step "pytest on the simulated Metal under ASan/UBSan, leak detection on"
# The type-check, build and rule tests run external compilers, which must
# not inherit the preloaded runtime; they ran in the plain passes. The
# tests that raise an Objective-C exception through metal.m (marked
# metal_exception) are left out: metal.m is built without
# -fobjc-arc-exceptions, so each such exception leaks what ARC held in the
# frames it unwinds (a known defect, shown by a strict xfail in
# tests/test_metalsim.py; drop the -m filter once metal.m has the flag).
(cd "$scratch" && "${san_env[@]}" MLXBUF_SANITIZER_RUN=1 MLXBUF_BACKEND=metal "$py" -m pytest -q \
    -p no:cacheprovider --deselect tests/test_metal_typecheck.py --deselect tests/test_build.py \
    --deselect tests/test_metalsim_rules.py -m "not metal_exception" tests)
