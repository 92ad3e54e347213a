#!/usr/bin/env bash
# Line coverage of cmetal/metal.m under the whole test suite, on the
# simulated Metal (Linux): a simulator build of mlxbuf._cmetal with gcov
# coverage (clang --coverage: its arc counters also count the @catch blocks
# that clang's source-based coverage miscounts) in a scratch copy of the
# tree, the README's simulator test command against it (every process,
# subprocesses included, adds its counts to the same .gcda file), then
# llvm-cov-19 gcov. Prints the percentage and every line of metal.m no test
# reached; fails below COVERAGE_MIN percent (default 90).
# The work tree's own build is left untouched.
# Usage: .ci/metal_coverage.sh [python]    (default: the python on PATH)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=$("${1:-python}" -c 'import sys; print(sys.executable)')
min=${COVERAGE_MIN:-90}
step() { printf '\n==== %s ====\n' "$*"; }

for tool in clang-19 llvm-cov-19; do
    command -v "$tool" >/dev/null || { echo "metal_coverage: $tool not found (apt-get install clang-19 llvm-19)"; exit 1; }
done

step "coverage build of the simulator variant (scratch copy)"
# shellcheck source=.ci/sanitizer_lib.sh
. "$root/.ci/sanitizer_lib.sh"
scratch=$(scratch_copy "$root")
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && MLXBUF_METAL_SIM=1 MLXBUF_COVERAGE=1 "$py" build_ffi.py)

step "the suite on the simulated Metal"
(cd "$scratch" && MLXBUF_BACKEND=metal "$py" -m pytest -q -p no:cacheprovider tests)

step "line coverage of cmetal/metal.m"
obj=$(ls "$scratch"/.metalsim-build/*/metal.o)
(cd "$scratch" && llvm-cov-19 gcov -o "${obj%.o}" cmetal/metal.m >/dev/null)
"$py" - "$scratch/metal.m.gcov" "$min" <<'PY'
import sys
report, minimum = sys.argv[1], float(sys.argv[2])
run, missed = 0, []
for line in open(report):
    count, number, text = line.split(":", 2)
    count = count.strip()
    if count == "-" or int(number) == 0:
        continue
    if count.startswith(("#", "=")):  # "=====": only an exception path leads there
        missed.append((int(number), text.rstrip("\n")))
    else:
        run += 1
total = run + len(missed)
percent = 100.0 * run / total if total else 0.0
print(f"cmetal/metal.m: {run} of {total} lines run ({percent:.1f} %); minimum {minimum:.0f} %")
print("lines not reached:")
for number, text in missed:
    print(f"  {number:5d}  {text.strip()}")
sys.exit(0 if percent >= minimum else 1)
PY
