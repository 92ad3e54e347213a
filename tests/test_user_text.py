"""Text a user reads: help(), reprs, --help, docstrings and comments."""

import inspect
import os
import pathlib
import pydoc
import re
import subprocess
import sys

import pytest

import mlxbuf

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
WAYS = ("Device.alloc_buffer", "BufferPool.alloc", "mlxbuf.asarray", "Device.from_numpy", "mlxbuf.from_dlpack",
        "Device.map_file", "mlxbuf.load_safetensors", "Buffer.from_raw")


def test_calling_buffer_names_the_ways_to_get_one():
    for args, kwargs in (((), {}), ((4096, "f32"), {}), ((), {"shape": (2,)})):
        with pytest.raises(TypeError) as exc:
            mlxbuf.Buffer(*args, **kwargs)
        for way in WAYS:
            assert way in str(exc.value)


def test_help_of_buffer_shows_no_catch_all_signature_and_says_how_to_get_one():
    text = pydoc.render_doc(mlxbuf.Buffer, renderer=pydoc.plaintext)
    head = text[: text.index("Methods defined here")]
    assert "*args" not in head and "**kwargs" not in head
    assert "raises TypeError" in head
    for way in WAYS:
        assert way in head
    assert str(inspect.signature(mlxbuf.Buffer)) == "()"


def test_repr_of_a_view_gives_its_own_bytes_first_then_the_allocation(device, tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(174))
    mapped = device.map_file(path)
    view = mapped.slice_view(120, 48).view("f32", (3, 4))
    backend = device.backend
    assert repr(view) == f"Buffer(f32, shape=(3, 4), nbytes=48, offset=120 of a 174-byte file mapping, device={backend})"
    assert repr(mapped) == f"Buffer(u8, shape=(174,), nbytes=174, device={backend})"
    whole = device.alloc_buffer(4096, "f32", (1024,))
    assert repr(whole) == f"Buffer(f32, shape=(1024,), nbytes=4096, device={backend})"
    assert repr(whole[4:6]) == f"Buffer(f32, shape=(2,), nbytes=8, offset=16 of a 4096-byte allocation, device={backend})"
    pooled = mlxbuf.BufferPool(device).alloc(4000, "u8", (4000,))
    assert repr(pooled) == f"Buffer(u8, shape=(4000,), nbytes=4000, offset=0 of a 4096-byte pooled allocation, device={backend})"


def test_dash_m_help_is_plain_text():
    r = subprocess.run([sys.executable, "-m", "mlxbuf", "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "``" not in r.stdout and "usage: python -m mlxbuf" in r.stdout
    assert "--backend" in r.stdout and "--number" in r.stdout


# Words that must not reach a user: internal documents, the project's
# history as "the seed", private helpers named as if they were API.
INTERNAL = re.compile(r"\bseed\b|DESIGN\.md|API\.md|METALSIM\.md|METAL_FACTS|``_[a-z]\w*``|\bissue \d", re.IGNORECASE)


def _public_docstrings():
    seen = set()
    out = []

    def walk(obj, name):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        if doc:
            out.append((name, doc))
        if inspect.ismodule(obj) or inspect.isclass(obj):
            for key, value in vars(obj).items():
                if key.startswith("_") and key not in ("__init__", "__getitem__", "__iter__", "__len__"):
                    continue
                if isinstance(value, property):
                    value = value.fget
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if getattr(value, "__module__", "") and str(getattr(value, "__module__", "")).startswith("mlxbuf"):
                    walk(value, f"{name}.{key}")

    for module_name in ("mlxbuf", "mlxbuf.interop", "mlxbuf.dlpack", "mlxbuf.safetensors", "mlxbuf.mapping",
                        "mlxbuf.external", "mlxbuf.__main__"):
        module = __import__(module_name, fromlist=["_"])
        walk(module, module_name)
    for name in mlxbuf.__all__:
        walk(getattr(mlxbuf, name), f"mlxbuf.{name}")
    return out


def test_docstrings_name_only_public_api():
    docs = _public_docstrings()
    assert len(docs) > 100  # the walk reached the classes and their methods
    bad = [(name, m.group()) for name, doc in docs for m in INTERNAL.finditer(doc)]
    assert not bad, bad


def test_sources_and_readme_never_call_the_rust_crate_the_seed():
    files = [ROOT / "README.md", *sorted((ROOT / "mlxbuf").glob("*.py")),
             *sorted(p for p in (ROOT / "cmetal").rglob("*") if p.suffix in (".c", ".h", ".m", ".md"))]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bseed\b", line, re.IGNORECASE)]
    assert not hits, hits
