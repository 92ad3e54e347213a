# Helpers shared by .ci/sanitize.sh, .ci/sanitize_metalsim.sh and
# .ci/metal_coverage.sh (sourced, not run).

# A copy of the tree at $1 in a new temporary directory (printed), without
# git data, virtual environments, builds or compiled extensions, so a
# special build there leaves the work tree's own build untouched.
scratch_copy() {
    local dir
    dir=$(mktemp -d)
    tar -C "$1" --exclude=./.git --exclude='./.venv*' --exclude='*.so' \
        --exclude=./build --exclude=./.metalsim-build --exclude='__pycache__' -cf - . |
        tar -C "$dir" -xf -
    echo "$dir"
}

# Set the array san_env: run a command with the sanitizer runtimes $1
# (space-separated files) preloaded, leak detection on through the
# project's suppressions under $2.
sanitizer_env() {
    local lib
    for lib in $1; do
        [ -f "$lib" ] || { echo "sanitizer runtime $lib is missing"; return 1; }
    done
    san_env=(
        env "LD_PRELOAD=$1"
        "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_init_order=1"
        "LSAN_OPTIONS=suppressions=$2/tests/sanitizer/lsan.supp:print_suppressions=0"
        "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1"
    )
}

# The canary: in directory $1, with python $2 and san_env, leak one storage
# of a device of backend $3 on purpose; LeakSanitizer must report it
# through the suppressions, or the leak check proves nothing.
leak_canary() {
    local canary status
    set +e
    canary=$(cd "$1" && "${san_env[@]}" "$2" -c "
import mlxbuf
from mlxbuf._cmetal import lib
buf = mlxbuf.Device('$3').alloc_buffer(4096, 'u8', (4096,))
lib.cm_storage_retain(buf._storage)   # one reference nobody will drop
" 2>&1)
    status=$?
    set -e
    if [ "$status" -eq 0 ] || ! grep -q "cm__storage_new" <<<"$canary"; then
        echo "LeakSanitizer did not report the deliberate leak (exit $status):"
        echo "$canary"
        return 1
    fi
    echo "reported as expected (exit $status): $(grep -m1 'Direct leak' <<<"$canary")"
}
