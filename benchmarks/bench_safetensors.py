"""Loading a safetensors file: mlxbuf's zero-copy mapping vs copying loaders.

Run (never part of the plain test command):

    python -m pytest benchmarks/bench_safetensors.py --benchmark-columns=min,median,mean,rounds

The "header" group opens a file of many small tensors (1.3 million by
default: an 89 MB header; ``MLXBUF_BENCH_ST_TENSORS=20K`` overrides the count),
where the cost is all in the header: ``load_safetensors`` (parse, validate,
one Buffer view per tensor), ``read_header`` (parse and validate only) and
the reference reader's ``safe_open`` (parse and validate; views come later,
one ``get_tensor`` at a time), side by side. Its file is generated once per
session, straight as JSON.

The file (1 GiB by default, 64 f32 tensors) is generated once per session
in a temporary directory; ``MLXBUF_BENCH_ST_BYTES`` overrides its size
(e.g. ``MLXBUF_BENCH_ST_BYTES=64M``) for CI or a quick look. The file was
just written, so it sits in the page cache: the copying loaders are timed
on memory bandwidth, not disk, which flatters them. The "load" group runs
its peers side by side; "first-touch" reads one mapped tensor right after
mapping it, so every page faults in once (page-cache hits, no disk).
"""

import json
import os
import struct

import numpy as np
import pytest
from _benchutil import parse_count

import mlxbuf

N_TENSORS = 64
HEADER_TENSORS_DEFAULT = "1.3M"
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size_from_env():
    text = os.environ.get("MLXBUF_BENCH_ST_BYTES", "1G").strip().upper().removesuffix("B").removesuffix("I")
    unit = _SUFFIX.get(text[-1:], 1) if text[-1:].isalpha() else 1
    number = text[:-1] if text[-1:].isalpha() else text
    total = int(float(number) * unit)
    if total < N_TENSORS * 4:
        raise pytest.UsageError(f"MLXBUF_BENCH_ST_BYTES={total} is too small for {N_TENSORS} f32 tensors")
    return total


@pytest.fixture(scope="session")
def st_file(tmp_path_factory):
    """(path, total data bytes, tensor names), written in chunks so generating needs little memory."""
    total = _size_from_env()
    per = (total // N_TENSORS) // 4 * 4
    header = {f"layer{i:02d}.weight": {"dtype": "F32", "shape": [per // 4], "data_offsets": [i * per, (i + 1) * per]} for i in range(N_TENSORS)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path_factory.mktemp("bench") / f"model-{total}.safetensors"
    chunk = np.random.default_rng(0).integers(0, 1 << 32, size=(1 << 22) // 4, dtype=np.uint32).view(np.float32)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        left = per * N_TENSORS
        while left:
            piece = memoryview(chunk).cast("B")[: min(left, chunk.nbytes)]
            f.write(piece)
            left -= len(piece)
    return path, per * N_TENSORS, list(header)


@pytest.fixture(scope="session")
def device():
    return mlxbuf.default_device()


def _index_all(tensors, names):
    # "Indexing": what a model loader does after opening, reaching every tensor.
    return sum(tensors[name].nbytes for name in names)


@pytest.mark.benchmark(group="safetensors-load")
def test_mlxbuf_load_safetensors(benchmark, st_file, device):
    path, nbytes, names = st_file

    def run():
        return _index_all(mlxbuf.load_safetensors(path, device), names)

    assert benchmark(run) == nbytes
    benchmark.extra_info["file_bytes"] = os.path.getsize(path)


@pytest.mark.benchmark(group="safetensors-load")
def test_safetensors_numpy_load_file(benchmark, st_file):
    st_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed")
    path, nbytes, names = st_file

    def run():
        tensors = st_numpy.load_file(str(path))
        return sum(tensors[name].nbytes for name in names)

    assert benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0) == nbytes


@pytest.mark.benchmark(group="safetensors-load")
def test_numpy_fromfile(benchmark, st_file):
    path, nbytes, _ = st_file

    def run():
        return np.fromfile(path, dtype=np.uint8).nbytes

    assert benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0) >= nbytes


@pytest.mark.benchmark(group="first-touch")
def test_first_touch_read_of_a_mapped_tensor(benchmark, st_file, device):
    path, nbytes, names = st_file
    name = names[len(names) // 2]

    def setup():
        # A fresh mapping each round, so every page of the tensor faults once.
        return (mlxbuf.load_safetensors(path, device)[name],), {}

    def read(tensor):
        return float(np.add.reduce(tensor.as_slice("u64", wait=False), dtype=np.uint64))

    benchmark.pedantic(read, setup=setup, rounds=5, iterations=1)
    tensor_bytes = nbytes // len(names)
    benchmark.extra_info["tensor_bytes"] = tensor_bytes
    benchmark.extra_info["GB_per_s_min"] = round(tensor_bytes / benchmark.stats.stats.min / 1e9, 2)


# ---- a header of many tensors ----------------------------------------------------


@pytest.fixture(scope="session")
def many_tensor_file(tmp_path_factory):
    """(path, tensor count): small tensors of four dtypes laid out as the
    reference writer lays them out (by decreasing element size), names like
    "w123456", so that 1.3M tensors make an 89 MB header."""
    text = os.environ.get("MLXBUF_BENCH_ST_TENSORS", "").strip() or HEADER_TENSORS_DEFAULT
    count = parse_count(text, "MLXBUF_BENCH_ST_TENSORS", binary=False)
    kinds = [("F32", 4), ("F16", 2), ("I64", 8), ("U8", 1)]
    specs = []
    for i in range(count):
        dtype, size = kinds[i % 4]
        shape = [1 + i % 3, 2] if i % 2 else [1 + i % 5]
        specs.append((-size, f"w{i}", dtype, shape, size * shape[0] * (shape[1] if len(shape) > 1 else 1)))
    specs.sort(key=lambda spec: spec[0])
    parts, offset = [], 0
    for _, name, dtype, shape, nbytes in specs:
        parts.append(f'"{name}":{{"dtype":"{dtype}","shape":{json.dumps(shape)},"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
    text = ("{" + ",".join(parts) + "}").encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path_factory.mktemp("bench-header") / f"header-{count}.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.write(b"\0" * offset)
    return path, count


@pytest.mark.benchmark(group="safetensors-header")
def test_header_mlxbuf_load_safetensors(benchmark, many_tensor_file, device):
    path, count = many_tensor_file
    result = benchmark.pedantic(lambda: len(mlxbuf.load_safetensors(path, device)), rounds=3, iterations=1)
    assert result == count
    benchmark.extra_info["header_bytes"] = struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.benchmark(group="safetensors-header")
def test_header_mlxbuf_read_header(benchmark, many_tensor_file):
    from mlxbuf.safetensors import read_header

    path, count = many_tensor_file
    assert benchmark.pedantic(lambda: len(read_header(path)), rounds=3, iterations=1) == count


@pytest.mark.benchmark(group="safetensors-header")
def test_header_safetensors_safe_open(benchmark, many_tensor_file):
    safetensors = pytest.importorskip("safetensors", reason="the safetensors package is not installed")
    path, count = many_tensor_file

    def run():
        with safetensors.safe_open(str(path), "np") as f:
            return len(f.keys())

    assert benchmark.pedantic(run, rounds=3, iterations=1) == count
