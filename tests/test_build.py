"""build_ffi.py: the cdef is the real header minus what cffi cannot parse."""

import importlib.util
import os
import sys

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_build_module():
    spec = importlib.util.spec_from_file_location("mlxbuf_build_ffi", os.path.join(ROOT, "build_ffi.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cdef_source_keeps_integer_defines_and_drops_the_rest():
    build = load_build_module()
    text = "\n".join([
        "#ifndef X_H", "#define X_H", "#include <stdint.h>",
        "#ifdef __cplusplus", 'extern "C" {', "#endif",
        "#define X_ONE 1    /* one */", "#define X_HEX 0x10", "#define X_NEG -3",
        "#define X_EXPR (1 << 2)", "typedef struct { int a; } x_t;", "int x_f(x_t *p);",
        "#ifdef __cplusplus", "}", "#endif", "#endif",
    ])
    out = build.cdef_source(text)
    assert "#define X_ONE 1" in out and "#define X_HEX 0x10" in out and "#define X_NEG -3" in out
    assert "X_EXPR" not in out and "#include" not in out and "#ifdef" not in out
    assert 'extern "C"' not in out
    assert "typedef struct { int a; } x_t;" in out
    ffi = FFI()
    ffi.cdef(out)
    assert ffi.sizeof("x_t") == 4


def test_every_header_parses_and_every_source_exists():
    build = load_build_module()
    ffi = FFI()
    ffi.cdef(build.read_cdef())
    assert build.HEADERS[0] == "cmetal/cmetal.h"
    for src in build.SOURCES:
        assert os.path.exists(os.path.join(ROOT, src))
    assert "cmetal/device.c" in build.SOURCES and "cmetal/host.c" in build.SOURCES
    assert build.MODULE_NAME == "mlxbuf._cmetal"


def test_the_macos_build_links_coregraphics_and_builds_metal_m_with_arc_exceptions(monkeypatch):
    """What a Mac build gets, read from build_ffi.py as it configures itself
    there: metal.m among the sources, ARC that survives exceptions
    (-fobjc-arc-exceptions), and CoreGraphics linked, without which
    MTLCreateSystemDefaultDevice() can return nil in a command-line process."""
    for name in ("MLXBUF_METAL_SIM", "MLXBUF_COVERAGE", "MLXBUF_SANITIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    build = load_build_module()
    assert "cmetal/metal.m" in build.SOURCES
    assert {"-fobjc-arc", "-fobjc-arc-exceptions"} <= set(build.COMPILE_ARGS)
    frameworks = [build.LINK_ARGS[i + 1] for i, arg in enumerate(build.LINK_ARGS) if arg == "-framework"]
    assert {"Metal", "Foundation", "CoreGraphics"} <= set(frameworks)
    assert ("CM_HAVE_METAL", "1") in build.DEFINE_MACROS
