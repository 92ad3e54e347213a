#!/usr/bin/env bash
# valgrind memcheck over `python -m mlxbuf` (the README's demo) on the
# normal build of mlxbuf._cmetal.
#
# CPython itself is not valgrind-clean (uninitialised-value reports from its
# small-int cache, objects never freed at exit), so the verdict is scoped to
# our code: the run fails if any error record or definitely-lost block has a
# frame in the C core (a cm_* function or a file of cmetal/). cffi's own
# one-time module set-up (_cffi_init) is not ours and does not count.
# Usage: .ci/valgrind.sh [python]    (default: the python on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
py=$("${1:-python}" -c 'import sys; print(sys.executable)')   # not a pyenv shim
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# PYTHONMALLOC=malloc routes every Python allocation through malloc so that
# memcheck sees them; --number shortens the demo's timing loops.
PYTHONMALLOC=malloc valgrind --quiet --leak-check=full \
    --show-leak-kinds=definite --errors-for-leak-kinds=none --num-callers=40 \
    --log-file="$log" "$py" -m mlxbuf --number 500 >/dev/null

"$py" - "$log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
records = re.split(r"\n==\d+== \n", text)
kinds = ("Invalid read", "Invalid write", "Invalid free", "Mismatched free",
         "uninitialised", "Syscall param", "definitely lost", "Source and destination overlap")
# valgrind names files without their directory: "(host.c:95)".
ours = re.compile(r"\bcm_\w+|/cmetal/|\((?:core|pool|host|error|interop|pycapsule)\.c:\d+\)")
errors = [r for r in records if any(k in r for k in kinds)]
mine = [r for r in errors if ours.search(r)]
print(f"valgrind memcheck, python -m mlxbuf: {len(errors)} error/definite-leak records "
      f"in all, {len(mine)} with a frame in mlxbuf's C core")
for r in mine:
    print(r)
sys.exit(1 if mine else 0)
PY
