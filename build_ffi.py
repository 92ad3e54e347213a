"""Build mlxbuf._cmetal, the cffi (API mode) extension over cmetal/.

Used two ways:
- by setuptools through ``cffi_modules=["build_ffi.py:ffibuilder"]`` in setup.py
  (``pip install .`` / ``pip install -e .``);
- directly, ``python build_ffi.py``, which compiles in a temporary directory and
  puts the extension into ``mlxbuf/`` so the source tree imports it in place.

The cdef is read from the real headers, so the header is the one source of
truth for the ABI.

Environment overrides (so CI can force a path):
- ``MLXBUF_METAL_SIM=1`` -> a simulator build (Linux): cmetal/metal.m runs
  against the simulated Metal in metalsim/ (clang-19 and ObjFW), so
  ``Device("metal")`` opens the simulated device and ``mlxbuf.metalsim``
  controls it. ``"auto"`` still picks the host backend.
- ``MLXBUF_SANITIZE=address,undefined`` -> ``-fsanitize=... -fno-omit-frame-pointer
  -O1 -g`` at compile and link time (run Python with the sanitizer runtime
  preloaded, e.g. ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``; a
  simulator build uses clang's runtime instead).
- ``MLXBUF_COVERAGE=1`` -> gcov-style coverage (``--coverage``; simulator
  builds only; .ci/metal_coverage.sh reads it).
- ``MLXBUF_DEBUG=1`` -> ``-O0 -g``.
- ``CLANG`` -> the clang of a simulator build (default clang-19).
"""

import glob
import os
import pathlib
import re
import shutil
import sys
import tempfile

from cffi import FFI

# ---- switches ---------------------------------------------------------------

HERE = pathlib.Path(__file__).resolve().parent
MODULE_NAME = "mlxbuf._cmetal"
HEADERS = ["cmetal/cmetal.h", "cmetal/interop.h", "cmetal/safetensors.h"]
IS_MACOS = sys.platform == "darwin"
IS_LINUX = sys.platform.startswith("linux")
SANITIZE = os.environ.get("MLXBUF_SANITIZE", "").strip()
DEBUG = os.environ.get("MLXBUF_DEBUG", "") == "1"
METAL_SIM = os.environ.get("MLXBUF_METAL_SIM", "") == "1"
COVERAGE = os.environ.get("MLXBUF_COVERAGE", "") == "1"
CLANG = os.environ.get("CLANG", "clang-19")

if SANITIZE:
    OPT_FLAGS = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-O1", "-g"]
    LINK_FLAGS = [f"-fsanitize={SANITIZE}"]
elif DEBUG:
    OPT_FLAGS, LINK_FLAGS = ["-O0", "-g"], []
else:
    OPT_FLAGS, LINK_FLAGS = ["-O2"], []
if COVERAGE:
    if not METAL_SIM:
        sys.exit("MLXBUF_COVERAGE=1 measures the simulator build: set MLXBUF_METAL_SIM=1 too")
    # gcov's arc counters also count the @catch blocks that clang's
    # source-based coverage miscounts.
    OPT_FLAGS = [*OPT_FLAGS, "--coverage"]
    LINK_FLAGS = [*LINK_FLAGS, "--coverage"]

# How metal.m is compiled wherever it is: on macOS, and in a simulator build.
# -fobjc-arc-exceptions: an Objective-C exception that a Metal call raises
# unwinds through ARC frames that metal.m catches further up; without the
# flag ARC does not release what those frames hold, so every caught
# exception would leak (clang's ARC documentation, "Exceptions").
METAL_OBJC_FLAGS = ["-fobjc-arc", "-fobjc-arc-exceptions", "-fblocks"]

# Sources are relative to the project root, where setuptools runs;
# `python build_ffi.py` makes them absolute (see build_in_place).
SOURCES = sorted(glob.glob("cmetal/*.c", root_dir=HERE)) + (["cmetal/metal.m"] if IS_MACOS else [])

COMPILE_ARGS = ["-std=c11", "-Wall", *OPT_FLAGS] + (METAL_OBJC_FLAGS if IS_MACOS else [])
# CoreGraphics: without it MTLCreateSystemDefaultDevice() can return nil in
# a command-line process (metal.m then falls back to MTLCopyAllDevices()).
MACOS_FRAMEWORKS = ["-framework", "Metal", "-framework", "Foundation", "-framework", "CoreGraphics"]
LINK_ARGS = LINK_FLAGS + (MACOS_FRAMEWORKS if IS_MACOS else [])
DEFINE_MACROS = [("CM_HAVE_METAL", "1")] if IS_MACOS else []
LIBRARIES = ["pthread"] if IS_LINUX else []
INCLUDE_DIRS = ["cmetal"]
EXTRA_OBJECTS: list[str] = []
# The simulator's kernel trampoline into mlxbuf.metalsim (Python).
EXTRA_CDEF = ""


def _load_metalsim_build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("metalsim_build", HERE / "metalsim" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if METAL_SIM:
    # Simulator build: metal.m and the simulator are Objective-C files with
    # per-file flags (the root class is built without ARC), so they are
    # compiled ahead (cached) and linked in; clang compiles and links the
    # rest, so coverage and sanitizer runtimes match.
    if not IS_LINUX:
        sys.exit("MLXBUF_METAL_SIM=1 is for Linux: on macOS the real Metal backend is built")
    _sim = _load_metalsim_build()
    _problem = _sim.toolchain_problem(CLANG)
    if _problem:
        sys.exit(f"MLXBUF_METAL_SIM=1 needs clang-19 and ObjFW: {_problem}")
    os.environ.setdefault("CC", CLANG)
    os.environ.setdefault("LDSHARED", f"{CLANG} -shared")
    EXTRA_OBJECTS = [str(p) for p in _sim.build_objects(OPT_FLAGS, ["-std=c11", *METAL_OBJC_FLAGS], CLANG)]
    HEADERS = [*HEADERS, "metalsim/metalsim.h"]
    DEFINE_MACROS = [("CM_HAVE_METAL", "1"), ("CM_METAL_SIMULATED", "1")]
    LIBRARIES = [*LIBRARIES, *_sim.LIBRARIES]
    INCLUDE_DIRS = [*INCLUDE_DIRS, "metalsim"]
    EXTRA_CDEF = 'extern "Python" int mlxbuf_metalsim_kernel(void *, const msim_kernel_args_t *);'

# ---- cdef from the headers ----------------------------------------------------

# cdef understands `#define NAME <integer>` and nothing else of the
# preprocessor, so integer defines stay and every other '#' line goes, along
# with the body of the C++ guard (`extern "C" {` and its closing brace).
_INT_DEFINE = re.compile(r"^\s*#\s*define\s+[A-Za-z_]\w*\s+(-?\d+|0[xX][0-9a-fA-F]+)[uUlL]*\s*(/\*.*\*/)?\s*$")


def cdef_source(header_text):
    """Return header_text with the lines cffi's cdef cannot parse removed."""
    kept, in_cplusplus_guard = [], False
    for line in header_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if re.match(r"#\s*ifdef\s+__cplusplus\b", stripped):
                in_cplusplus_guard = True
            elif in_cplusplus_guard and re.match(r"#\s*endif\b", stripped):
                in_cplusplus_guard = False
            elif _INT_DEFINE.match(line):
                kept.append(line)
            continue
        if not in_cplusplus_guard:
            kept.append(line)
    return "\n".join(kept)


def read_cdef():
    """The cdef text of every header in HEADERS, in order (and the simulator's trampoline)."""
    return "\n".join([*(cdef_source((HERE / h).read_text()) for h in HEADERS), EXTRA_CDEF])


def make_builder(root=None):
    """An FFI builder for MODULE_NAME; paths are made absolute under root if given."""
    where = (lambda p: str(pathlib.Path(root) / p)) if root else str
    builder = FFI()
    builder.cdef(read_cdef())
    builder.set_source(
        MODULE_NAME,
        "\n".join(f'#include "{pathlib.PurePath(h).name}"' for h in HEADERS),
        sources=[where(s) for s in SOURCES],
        include_dirs=[where(d) for d in INCLUDE_DIRS],
        define_macros=DEFINE_MACROS,
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
        extra_objects=EXTRA_OBJECTS,
        libraries=LIBRARIES,
        # Other C sources include Python.h without the limited API, and the
        # in-place build and setuptools must name the file alike (or a stale
        # copy of one shadows the other).
        py_limited_api=False,
    )
    return builder


ffibuilder = make_builder()


def build_in_place():
    """Compile in a temporary directory and copy the extension into mlxbuf/."""
    # cffi compiles from inside tmpdir, so every path must be absolute here.
    builder = make_builder(root=HERE)
    with tempfile.TemporaryDirectory(prefix="mlxbuf-build-") as tmpdir:
        built = pathlib.Path(builder.compile(tmpdir=tmpdir, verbose=bool(os.environ.get("MLXBUF_VERBOSE"))))
        target = HERE / "mlxbuf" / built.name
        for stale in (HERE / "mlxbuf").glob("_cmetal.*.so"):
            if stale.name != built.name:
                stale.unlink()
        # Copy to a temporary name then rename, so a process that has the old
        # extension mapped keeps a valid file.
        tmp_target = target.with_name(target.name + ".tmp")
        shutil.copyfile(built, tmp_target)
        os.replace(tmp_target, target)
    print(f"built {target.relative_to(HERE)}")
    return target


if __name__ == "__main__":
    build_in_place()
