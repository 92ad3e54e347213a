"""Compile the simulated Metal (metalsim/*.m) and cmetal/metal.m for Linux.

Used by build_ffi.py for a simulator build (MLXBUF_METAL_SIM=1) and by the
simulator's own rule tests, which link the same objects into a small
executable. One place holds the flags, so every user compiles alike.

Objects are cached in .metalsim-build/<key>/ (not under build/: a build/
directory in the project root would shadow `python -m build`), keyed by
the compiler, the flags and the text of every source and header involved,
so repeated builds (pip runs build_ffi.py several times per install)
compile once. An object counts only once its ".done" stamp exists; it is
compiled under its final name, because a coverage build (--coverage)
records that path for its .gcda data.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIM_DIR = ROOT / "metalsim"
STUBS = ROOT / "cmetal" / "stubs" / "sdk"
CLANG = os.environ.get("CLANG", "clang-19")

# The root class implements retain/release, which ARC forbids.
ROOT_CLASS_SOURCE = "NSObject.m"
SIM_SOURCES = sorted(p.name for p in SIM_DIR.glob("*.m"))

# Every Objective-C file on the ObjFW runtime (blocks are ObjFW objects;
# @"..." literals use the class the prefix header declares).
OBJFW_FLAGS = [
    "-fobjc-runtime=objfw", "-fblocks", "-fexceptions", "-fobjc-exceptions", "-funwind-tables",
    "-fconstant-string-class=NSConstantString", "-Xclang", "-fno-constant-cfstrings",
    "-fPIC", "-g", "-Wall", "-Wextra", "-Werror",
    "-I", str(STUBS), "-include", str(SIM_DIR / "prefix.h"),
]
SIM_FLAGS = ["-D_GNU_SOURCE", "-I", str(SIM_DIR), "-fobjc-arc", "-fobjc-arc-exceptions"]
ROOT_CLASS_FLAGS = ["-D_GNU_SOURCE", "-I", str(SIM_DIR), "-fno-objc-arc"]
LIBRARIES = ["objfw", "objfwrt", "pthread"]


def toolchain_problem(clang: str = CLANG) -> str | None:
    """Why a simulator build cannot work here, or None when it can."""
    if not shutil.which(clang):
        return f"{clang} not found (Debian: apt-get install clang-19)"
    if not (pathlib.Path("/usr/include/ObjFWRT/ObjFWRT.h").exists() or _has_objfw(clang)):
        return "ObjFW not found (Debian 12: libobjfw1-dev from bookworm-backports)"
    return None


def _has_objfw(clang: str) -> bool:
    probe = subprocess.run([clang, "-x", "c", "-", "-o", os.devnull, "-lobjfwrt", "-lobjfw"],
                           input="int main(void){return 0;}", capture_output=True, text=True)
    return probe.returncode == 0


def _key(parts: list[str], files: list[pathlib.Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    for f in sorted(files):
        h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _headers() -> list[pathlib.Path]:
    found = [*SIM_DIR.glob("*.h"), *STUBS.rglob("*.h"), *(ROOT / "cmetal").glob("*.h")]
    return [p.resolve() for p in found]


def _done(obj: pathlib.Path) -> pathlib.Path:
    return obj.with_name(obj.name + ".done")


def _compile(clang: str, src: pathlib.Path, obj: pathlib.Path, flags: list[str]) -> None:
    cmd = [clang, "-c", str(src), "-o", str(obj), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        obj.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {src.name} failed:\n{' '.join(cmd)}\n{result.stderr}")
    _done(obj).touch()


def build_objects(
    extra_flags: list[str] | None = None,
    metal_flags: list[str] | None = None,
    clang: str = CLANG,
    out_root: pathlib.Path | None = None,
) -> list[pathlib.Path]:
    """Compile the simulator and, with metal_flags (the backend's own
    Objective-C flags), cmetal/metal.m; return the object files.

    extra_flags (optimisation, sanitizers, coverage) apply to every file.
    """
    extra = list(extra_flags or [])
    jobs: list[tuple[pathlib.Path, list[str]]] = []
    for name in SIM_SOURCES:
        own = ROOT_CLASS_FLAGS if name == ROOT_CLASS_SOURCE else SIM_FLAGS
        jobs.append((SIM_DIR / name, OBJFW_FLAGS + own + extra))
    if metal_flags is not None:
        metal = [*OBJFW_FLAGS, *metal_flags, "-D_DEFAULT_SOURCE", "-DCM_HAVE_METAL=1",
                 "-I", str(ROOT / "cmetal"), *extra]
        jobs.append((ROOT / "cmetal" / "metal.m", metal))
    headers = _headers()
    out_root = out_root or ROOT / ".metalsim-build"
    objects = []
    todo = []
    for src, flags in jobs:
        key = _key([clang, *flags], [src, *headers])
        obj = out_root / key / (src.stem + ".o")
        objects.append(obj)
        if not _done(obj).exists():
            obj.parent.mkdir(parents=True, exist_ok=True)
            todo.append((src, obj, flags))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda job: _compile(clang, *job), todo))
    return objects


def build_executable(
    sources: list[pathlib.Path],
    out: pathlib.Path,
    extra_flags: list[str] | None = None,
    clang: str = CLANG,
) -> pathlib.Path:
    """Link the simulator and the given Objective-C (ARC) sources into a
    program at `out` (the rule tests); rebuilt only when an input changed."""
    extra = list(extra_flags or [])
    objects = build_objects(extra, None, clang)
    flags = [*OBJFW_FLAGS, *SIM_FLAGS, *extra]
    key = _key([clang, *flags, *map(str, objects)], [*sources, *_headers(), *objects])
    stamp = out.with_name(out.name + ".key")
    if out.exists() and stamp.exists() and stamp.read_text() == key:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    cmd = [clang, *flags, *map(str, sources), *map(str, objects), "-o", str(tmp),
           *(f"-l{lib}" for lib in LIBRARIES)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking {out.name} failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(tmp, out)
    stamp.write_text(key)
    return out
