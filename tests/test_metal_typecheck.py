"""The Objective-C Metal backend type-checks without a Mac, and the check bites.

`cmetal/check_objc.sh` compiles every `cmetal/*.m` with clang-19 (ARC,
`-Werror`, Apple targets) against the SDK-shaped stubs in `cmetal/stubs`.
This is the only verification the Metal backend gets on Linux: it proves the
file is well-typed ARC Objective-C against the declared Metal API, not that
it runs. In CI (the `CI` environment variable set) a missing clang-19 is a
failure, never a skip; elsewhere it skips with the reason.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "cmetal" / "check_objc.sh"
METAL_M = ROOT / "cmetal" / "metal.m"
CLANG = os.environ.get("CLANG", "clang-19")
PASSES = 3  # arm64, x86_64, arm64 with the pre-macOS-15-SDK branch


def _require_clang():
    if shutil.which(CLANG):
        return
    reason = (
        f"{CLANG} not found: the Objective-C type-check of cmetal/metal.m needs it "
        "(Debian/Ubuntu: apt-get install clang-19; elsewhere set CLANG to a clang >= 19)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. CI must run this check, so this is a failure, not a skip.", pytrace=False)
    pytest.skip(reason)


def _run_check(*args, clang=CLANG):
    return subprocess.run(
        ["sh", str(CHECK), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "CLANG": clang},
        timeout=600,
    )


def test_metal_backend_typechecks_against_stubs():
    _require_clang()
    result = _run_check()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    ok_lines = [line for line in result.stdout.splitlines() if line.startswith("ok ") and "metal.m" in line]
    assert len(ok_lines) == PASSES, output
    assert "FAIL" not in output


# Each mutation injects one mistake the check exists to catch. The original
# text must still be in metal.m, so a refactor that removes it fails here
# and the mutation gets updated rather than silently testing nothing.
MUTATIONS = [
    pytest.param(
        "[blit copyFromBuffer:src",
        "[blit copyFromBufer:src",
        "copyFromBufer:sourceOffset:toBuffer:destinationOffset:size:' not found",
        id="misspelled-selector",
    ),
    pytest.param(
        "@selector(storageMode)",
        "@selector(storageMod)",
        "undeclared selector 'storageMod'",
        id="undeclared-selector",
    ),
    pytest.param(
        "id obj = (__bridge_transfer id)p;",
        "id obj = (id)p;",
        "requires a bridged cast",
        id="missing-arc-bridge",
    ),
    pytest.param(
        "#define CM_MACOS15_AVAILABLE @available(macOS 15.0, iOS 18.0, *)",
        "#define CM_MACOS15_AVAILABLE 1",
        "is only available on macOS 15.0 or newer",
        id="macos15-api-outside-available",
    ),
    pytest.param(
        "[ce setBytes:args length:sizeof *args atIndex:index];",
        "[ce setBytes:args length:sizeof *args];",
        "no known instance method for selector 'setBytes:length:'",
        id="selector-missing-a-part",
    ),
]


@pytest.mark.parametrize("original, mutated, diagnostic", MUTATIONS)
def test_check_rejects_injected_mistake(tmp_path, original, mutated, diagnostic):
    _require_clang()
    source = METAL_M.read_text()
    assert original in source, f"mutation anchor {original!r} is no longer in metal.m; update the test"
    bad = tmp_path / "metal_mutated.m"
    bad.write_text(source.replace(original, mutated))
    result = _run_check(bad)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "FAIL" in output
    assert diagnostic in output, output


def test_macos15_api_is_weakly_linked_for_macos14():
    """Built for macOS 14, the residency-set class is a weak import behind a runtime check.

    Otherwise the extension would fail to load on macOS 14, where
    MTLResidencySetDescriptor does not exist. clang emits real Mach-O
    assembly without an SDK, so this is checked at code-generation level.
    """
    _require_clang()
    stubs = ROOT / "cmetal" / "stubs"
    result = subprocess.run(
        [
            CLANG, "-x", "objective-c", "-S", "-o", "-", "-fobjc-arc", "-fblocks",
            "-target", "arm64-apple-macos14", "-nostdlibinc",
            "-isystem", str(stubs / "libc"), "-isystem", str(stubs / "sdk"),
            "-DCM_HAVE_METAL", "-I", str(ROOT / "cmetal"), str(METAL_M),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assembly = result.stdout
    assert ".weak_reference _OBJC_CLASS_$_MTLResidencySetDescriptor" in assembly
    assert "___isPlatformVersionAtLeast" in assembly


def test_check_fails_when_the_compiler_is_missing(tmp_path):
    """A missing compiler must fail the script, never pass it silently."""
    result = _run_check(clang=str(tmp_path / "no-such-clang"))
    assert result.returncode != 0
    assert "not found" in result.stderr


@pytest.mark.skipif(sys.platform != "darwin", reason="the real-SDK check needs macOS with Xcode or the Command Line Tools")
def test_metal_backend_typechecks_against_the_macos_sdk():
    # Apple's clang through the xcode-select shim, against the installed SDK.
    result = _run_check("--sdk", clang="/usr/bin/clang")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAIL" not in output
