#!/usr/bin/env bash
# The sanitizer passes (issue 7):
#  1. the C core alone (tests/c) under ASan+UBSan, then under valgrind
#     (clang-19 and its sanitizer runtime where installed, else gcc's);
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

# The sanitizer runtime: clang-19's where it is installed, because it
# locks its allocator around fork() and gcc 12's does not: a child forked
# while another thread allocates can then hang in malloc for good (seen in
# tests/c/test_fork.c under load: the child's worker thread waits forever
# on a size-class lock of libasan's allocator). gcc's otherwise.
clang_runtime=$(clang-19 -print-file-name=libclang_rt.asan-x86_64.so 2>/dev/null || true)
if [ -f "$clang_runtime" ]; then
    c_core_cc="clang-19 -gdwarf-4"        # DWARF 4: what valgrind 3.19 reads
    build_env=(env CC=clang-19 "LDSHARED=clang-19 -shared")
    runtimes=$clang_runtime
else
    c_core_cc=gcc
    build_env=(env)
    runtimes="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
fi

step "C core under ASan/UBSan and valgrind (tests/c/run.sh, $c_core_cc)"
CC=$c_core_cc sh tests/c/run.sh valgrind

step "sanitizer build of mlxbuf._cmetal (scratch copy)"
# shellcheck source=.ci/sanitizer_lib.sh
. "$root/.ci/sanitizer_lib.sh"
scratch=$(scratch_copy "$root")
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && "${build_env[@]}" MLXBUF_SANITIZE=address,undefined "$py" build_ffi.py)

# Preloaded, because the interpreter is not instrumented.
sanitizer_env "$runtimes" "$root" || { echo "(Debian: libclang-rt-19-dev, or libgcc-NN-dev)"; exit 1; }

step "canary: a leak made by cmetal/ must still be reported"
leak_canary "$scratch" "$py" host

step "pytest under ASan/UBSan, leak detection on"
# The type-check, build and simulator rule tests run external compilers,
# which must not inherit the preloaded runtimes; they ran in the plain pass.
(cd "$scratch" && "${san_env[@]}" MLXBUF_SANITIZER_RUN=1 "$py" -m pytest -q -p no:cacheprovider \
    --deselect tests/test_metal_typecheck.py --deselect tests/test_build.py \
    --deselect tests/test_metalsim_rules.py tests)

step "valgrind memcheck of python -m mlxbuf"
bash "$root/.ci/valgrind.sh" "$py"
