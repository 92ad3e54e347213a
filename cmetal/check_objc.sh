#!/bin/sh
# Type-check the Objective-C (ARC) Metal backend without a Mac.
#
#   cmetal/check_objc.sh [FILE.m ...]     stub check (Linux or macOS)
#   cmetal/check_objc.sh --sdk [FILE.m ...]  the same passes against the real
#                                          SDK (macOS with Xcode / CLT only)
#
# The stub check compiles every cmetal/*.m (or the files given) with
# clang-19 (ARC with -fobjc-arc-exceptions, as the build compiles metal.m)
# against the SDK-shaped stub headers in cmetal/stubs
# (-nostdlibinc -isystem cmetal/stubs/libc -isystem cmetal/stubs/sdk), for the
# minimum supported macOS, so that calling a macOS 15 API outside
# @available, sending a selector the SDK does not declare, or a missing ARC
# bridge is an error. It runs three passes per file:
#   arm64-apple-macos14, x86_64-apple-macos14 (BOOL is signed char there),
#   and arm64 again with CM_METAL_NO_RESIDENCY_SDK (the pre-macOS-15-SDK
#   branch of metal.m).
# Any diagnostic fails the check (-Werror, and any output at all counts).
# CLANG overrides the compiler (default clang-19). See
# METAL_FACTS.md (the team's Metal facts sheet) section 2 for why each flag is there.
set -u

here=$(cd "$(dirname "$0")" && pwd)
clang=${CLANG:-clang-19}
mode=stubs
if [ "${1:-}" = "--sdk" ]; then
    mode=sdk
    shift
fi

if [ $# -eq 0 ]; then
    set -- "$here"/*.m
fi
if [ ! -e "$1" ]; then
    echo "check_objc: no Objective-C files to check" >&2
    exit 2
fi
if ! command -v "$clang" >/dev/null 2>&1; then
    echo "check_objc: $clang not found (install clang-19 or set CLANG)" >&2
    exit 127
fi

flags="-x objective-c -fsyntax-only -fobjc-arc -fobjc-arc-exceptions -fblocks
       -Wall -Wextra -Werror -Wundeclared-selector -DCM_HAVE_METAL"
passes="arm64-apple-macos14: x86_64-apple-macos14: arm64-apple-macos14:-DCM_METAL_NO_RESIDENCY_SDK"

if [ "$mode" = sdk ]; then
    sdk=$(xcrun --sdk macosx --show-sdk-path 2>/dev/null) || {
        echo "check_objc: --sdk needs macOS with xcrun (Xcode or Command Line Tools)" >&2
        exit 2
    }
fi

# Paths are passed as separate quoted words, so directories with spaces work.
run_clang() {
    if [ "$mode" = sdk ]; then
        # shellcheck disable=SC2086  # $flags and $extra are flag lists
        "$clang" $flags -target "$1" -isysroot "$sdk" -I "$here" $2 "$3"
    else
        # shellcheck disable=SC2086
        "$clang" $flags -target "$1" -nostdlibinc \
            -isystem "$here/stubs/libc" -isystem "$here/stubs/sdk" -I "$here" $2 "$3"
    fi
}

status=0
for file in "$@"; do
    for pass in $passes; do
        target=${pass%%:*}
        extra=${pass#*:}
        out=$(run_clang "$target" "$extra" "$file" 2>&1)
        rc=$?
        if [ $rc -ne 0 ] || [ -n "$out" ]; then
            echo "FAIL $file [$target${extra:+ $extra}]"
            [ -n "$out" ] && printf '%s\n' "$out"
            status=1
        else
            echo "ok   $file [$target${extra:+ $extra}]"
        fi
    done
done
exit $status
