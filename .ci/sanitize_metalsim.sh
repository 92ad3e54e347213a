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
# shellcheck source=.ci/sanitizer_lib.sh
. "$root/.ci/sanitizer_lib.sh"
scratch=$(scratch_copy "$root")
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && MLXBUF_METAL_SIM=1 MLXBUF_SANITIZE=address,undefined "$py" build_ffi.py)

# clang's shared runtime carries ASan and UBSan together.
sanitizer_env "$("$clang" -print-file-name=libclang_rt.asan-x86_64.so)" "$root" ||
    { echo "(Debian: libclang-rt-19-dev)"; exit 1; }

step "canary: a leak made by cmetal/ on the simulated device must still be reported"
leak_canary "$scratch" "$py" metal

step "pytest on the simulated Metal under ASan/UBSan, leak detection on"
# The type-check, build and rule tests run external compilers, which must
# not inherit the preloaded runtime; they ran in the plain passes. The
# tests that raise an Objective-C exception through metal.m (marked
# metal_exception) run too: metal.m is built with -fobjc-arc-exceptions,
# so the frames an exception unwinds release what ARC held, and
# LeakSanitizer checks that they do.
(cd "$scratch" && "${san_env[@]}" MLXBUF_SANITIZER_RUN=1 MLXBUF_BACKEND=metal "$py" -m pytest -q \
    -p no:cacheprovider --deselect tests/test_metal_typecheck.py --deselect tests/test_build.py \
    --deselect tests/test_metalsim_rules.py tests)
