"""safetensors headers as the reference reader (the safetensors package) reads them.

What the reference refuses, mlxbuf refuses: a data section the tensors do
not tile exactly (trailing bytes, holes, an empty tensor that does not sit
where a tensor ends), lone surrogates, dimensions beyond 64 bits. mlxbuf is
stricter in a few documented places (duplicate and unknown keys,
misaligned tensors, dimensions beyond int64, dtypes it has no type for).
What mlxbuf writes, the reference reads. The reference is the oracle: the
catalog below runs through both.
"""

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlxbuf
from mlxbuf.safetensors import SafetensorsError, load_safetensors, parse_header, save_safetensors
from support import assert_names, fuzz_examples

reference = pytest.importorskip("safetensors.numpy", reason="the safetensors package (test extra) is the oracle")
from safetensors import safe_open  # noqa: E402

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DTYPES = ["f32", "f16", "f64", "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "bool"]


def entry(**changes):
    e = dict(F32)
    e.update(changes)
    return e


def make(header, data=b"", raw=None):
    """A file of the header (a dict, or raw bytes), padded to 8 bytes, then data."""
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def reference_accepts(data, tmp_path):
    """Whether the reference reader opens these bytes (from memory and as a file)."""
    try:
        reference.load(data)
    except Exception:  # noqa: BLE001 - any refusal
        from_bytes = False
    else:
        from_bytes = True
    path = tmp_path / "ref.safetensors"
    path.write_bytes(data)
    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001
        from_file = False
    else:
        from_file = True
    return from_bytes or from_file


def we_accept(data, tmp_path, device):
    path = tmp_path / "ours.safetensors"
    path.write_bytes(data)
    try:
        loaded = load_safetensors(path, device)
    except SafetensorsError:
        return False, None
    return True, loaded


SURROGATE_NAME = b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
SURROGATE_NAME_LOW = b'{"a\\udc00b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
SURROGATE_META_VALUE = b'{"__metadata__":{"k":"\\udc00"}}'
SURROGATE_META_KEY = b'{"__metadata__":{"\\uD83D":"v"}}'
PAIR_META = b'{"__metadata__":{"k":"\\ud83d\\ude00"}}'

# (id, file bytes, whether the reference accepts it, fragments of our message, tensor named)
REFUSED_BY_BOTH = [
    ("trailing-byte", make({"a": F32}, b"\0" * 9), ["1 bytes at data offset 8", "cover the 9-byte"], None),
    ("polyglot-html", make({}, b"<html><script>alert(1)</script></html>"), ["at data offset 0", "belong to no"], None),
    ("hole-at-start", make({"a": entry(data_offsets=[8, 16])}, b"\0" * 16), ["[0, 8)", "belong to no"], "a"),
    ("hole-in-middle", make({"a": F32, "b": entry(data_offsets=[16, 24])}, b"\0" * 24), ["[8, 16)"], "b"),
    ("empty-inside", make({"a": F32, "z": entry(shape=[0], data_offsets=[4, 4])}, b"\0" * 8),
     ["empty tensor at data offset 4", "inside tensor 'a'"], "z"),
    ("empty-alone-past-0", make({"z": entry(shape=[0], data_offsets=[8, 8])}, b"\0" * 8), ["[0, 8)"], "z"),
    ("overlap", make({"a": F32, "b": entry(data_offsets=[4, 12])}, b"\0" * 12), ["overlap tensor 'a'"], "b"),
    ("same-range", make({"a": F32, "b": F32}, b"\0" * 8), ["overlap tensor"], None),
    ("surrogate-name", make(None, b"\0" * 8, raw=SURROGATE_NAME), ["\\ud800", "not valid Unicode"], None),
    ("surrogate-in-name", make(None, b"\0" * 8, raw=SURROGATE_NAME_LOW), ["\\udc00"], None),
    ("surrogate-meta-value", make(None, raw=SURROGATE_META_VALUE), ["\\udc00", "__metadata__ entry 'k'"], None),
    ("surrogate-meta-key", make(None, raw=SURROGATE_META_KEY), ["\\ud83d", "__metadata__"], None),
    ("dim-2**64+1", make({"a": entry(shape=[2**64 + 1, 0], data_offsets=[0, 0])}), [str(2**64 + 1)], "a"),
    ("dims-overflow", make({"a": entry(shape=[2**32, 2**32], data_offsets=[0, 0])}), ["needs"], "a"),
    ("offsets-past-2**64", make({"a": entry(data_offsets=[0, 2**64])}), [str(2**64)], "a"),
    ("nul-padding", make(None, raw=b"{}\0\0\0\0\0\0"), ["not valid JSON"], None),
    ("bom", make(None, raw=b"\xef\xbb\xbf{}"), ["not valid JSON"], None),
    ("two-objects", make(None, raw=b"{} {}"), ["not valid JSON"], None),
]

# Accepted by the reference, refused by mlxbuf on purpose.
STRICTER = [
    ("unknown-key", make({"a": entry(extra=1)}, b"\0" * 8), ["unknown keys extra"], "a"),
    ("duplicate-name", make(None, b"\0" * 8, raw=b'{"a":' + json.dumps(F32).encode() + b',"a":'
                            + json.dumps(F32).encode() + b"}"), ["duplicate key 'a'"], None),
    ("misaligned", make({"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "a": entry(data_offsets=[1, 9])}, b"\0" * 9), ["not aligned"], "a"),
    ("dim-2**63", make({"a": entry(shape=[2**63, 0], data_offsets=[0, 0])}), [str(2**63), "2**60 - 1"], "a"),
    ("dim-2**60", make({"a": entry(shape=[2**30, 0, 2**30], data_offsets=[0, 0])}), [str(2**60), "no element"], "a"),
    ("f8-dtype", make({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 8),
     ["F8_E4M3"], "a"),
]

ACCEPTED_BY_BOTH = [
    ("empty-at-end", make({"a": F32, "z": entry(shape=[0], data_offsets=[8, 8])}, b"\0" * 8)),
    ("empty-at-start", make({"a": F32, "z": entry(shape=[0], data_offsets=[0, 0])}, b"\0" * 8)),
    ("two-empty-same-offset", make({"y": entry(shape=[0], data_offsets=[0, 0]), "z": entry(shape=[0], data_offsets=[0, 0])})),
    ("out-of-file-order", make({"b": entry(data_offsets=[8, 16]), "a": F32}, b"\0" * 16)),
    ("surrogate-pair", make(None, raw=PAIR_META)),
    ("metadata-null", make({"__metadata__": None})),
    ("leading-space", make(None, raw=b" {}")),
    ("dim-2**60-1", make({"a": entry(shape=[2**60 - 1, 0], data_offsets=[0, 0])})),
]


@pytest.mark.parametrize("data, fragments, tensor", [c[1:] for c in REFUSED_BY_BOTH], ids=[c[0] for c in REFUSED_BY_BOTH])
def test_refused_as_the_reference_refuses(host_device, tmp_path, data, fragments, tensor):
    assert not reference_accepts(data, tmp_path), "the catalog is wrong: the reference reads this"
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError) as excinfo:
        load_safetensors(path, host_device)
    assert isinstance(excinfo.value, mlxbuf.InvalidArgument)
    assert_names(excinfo, str(path), *fragments)
    if tensor is not None:
        assert excinfo.value.tensor == tensor
    with pytest.raises(SafetensorsError):
        mlxbuf.safetensors_metadata(path)


@pytest.mark.parametrize("data, fragments, tensor", [c[1:] for c in STRICTER], ids=[c[0] for c in STRICTER])
def test_stricter_than_the_reference(host_device, tmp_path, data, fragments, tensor):
    assert reference_accepts(data, tmp_path), "the reference refuses this too: move it to REFUSED_BY_BOTH"
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError) as excinfo:
        load_safetensors(path, host_device)
    assert_names(excinfo, *fragments)
    assert excinfo.value.tensor == tensor


@pytest.mark.parametrize("data", [c[1] for c in ACCEPTED_BY_BOTH], ids=[c[0] for c in ACCEPTED_BY_BOTH])
def test_accepted_as_the_reference_accepts(host_device, tmp_path, data):
    assert reference_accepts(data, tmp_path)
    ok, loaded = we_accept(data, tmp_path, host_device)
    assert ok
    for buf in loaded.values():
        buf.numpy()


def test_surrogate_pair_metadata_decodes(tmp_path):
    path = tmp_path / "pair.safetensors"
    path.write_bytes(make(None, raw=PAIR_META))
    assert mlxbuf.safetensors_metadata(path) == {"k": "\N{GRINNING FACE}"}


# ---- dimensions --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2**64, 2**64 + 1, 2**70, 2**63, 2**60])
def test_huge_dimension_beside_a_zero_is_refused_everywhere(host_device, bad):
    """(2**64 + 1, 0) holds no bytes, so the product check passed it (and
    numpy then refused the Buffer's views); every path now refuses an empty
    shape no array can have."""
    buf = host_device.alloc_buffer(16, "u8", (16,))
    pool = mlxbuf.BufferPool(host_device)
    calls = {
        "alloc_buffer tuple": lambda: host_device.alloc_buffer(8, "u8", (bad, 0)),
        "alloc_buffer list": lambda: host_device.alloc_buffer(8, "u8", [0, bad]),
        "view": lambda: buf.view("f32", (bad, 0)),
        "view 3-d": lambda: buf.view("u8", (1, 0, bad)),
        "reshape": lambda: buf.view("u8", (0,)).reshape(bad, 0),
        "pool": lambda: pool.alloc(8, "u8", (bad, 0)),
        "allocator": lambda: pool.allocator(8, "u8", (0, bad)),
        "alloc_batch": lambda: pool.alloc_batch([(8, "u8", (bad, 0))]),
        "from_raw": lambda: mlxbuf.Buffer.from_raw(host_device, buf.data_ptr, 16, "u8", (bad, 0), owner=buf),
        "map_file": None,
    }
    for name, call in calls.items():
        if call is None:
            continue
        with pytest.raises(mlxbuf.InvalidArgument) as excinfo:
            call()
        assert_names(excinfo, str(bad))
    pool.close()
    assert host_device.stats().live_storages == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_empty_shape_still_makes_arrays(host_device, dtype):
    limit = 2**60 - 1
    for shape in ((limit, 0), (0, limit), (2**30, 0, 2**30 - 1)):
        buf = host_device.alloc_buffer(8, "u8", (8,)).view(dtype, shape)
        assert buf.shape == shape and buf.numpy().shape == shape
        assert np.from_dlpack(buf).shape == shape


def test_numpy_integer_dimensions_are_checked_too(host_device):
    with pytest.raises(mlxbuf.InvalidArgument):
        host_device.alloc_buffer(8, "u8", (np.uint64(2**63), 0))
    with pytest.raises(mlxbuf.InvalidArgument):
        host_device.alloc_buffer(8, "u8", [np.uint64(2**64 - 1), 1])
    assert host_device.alloc_buffer(8, "u8", (np.int64(2), np.uint8(0))).shape == (2, 0)


# ---- what we write, the reference reads --------------------------------------------------

NAMES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12
).filter(lambda n: n != "__metadata__")


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(NAMES, max_size=6, unique=True))
    out = {}
    for name in names:
        dt = mlxbuf.as_dtype(draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        n = int(np.prod(shape))
        values = draw(st.binary(min_size=n * dt.size, max_size=n * dt.size))
        out[name] = np.frombuffer(values, dtype=np.uint8).view(dt.numpy).reshape(shape) if n else np.zeros(shape, dt.numpy)
    return out


@settings(max_examples=60)
@given(tensors=tensor_dicts(), metadata=st.one_of(st.none(), st.dictionaries(NAMES, NAMES, max_size=3)))
def test_the_reference_reads_everything_we_write(tmp_path_factory, tensors, metadata):
    path = tmp_path_factory.mktemp("oracle") / "ours.safetensors"
    save_safetensors(path, tensors, metadata)
    with safe_open(str(path), "np") as f:
        assert set(f.keys()) == set(tensors)
        assert (f.metadata() or {}) == (metadata or {})
        for name, array in tensors.items():
            got = f.get_tensor(name)
            assert got.shape == array.shape and got.dtype == array.dtype
            np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), array.reshape(-1).view(np.uint8))
    loaded = load_safetensors(path, mlxbuf.Device("host"))
    assert set(loaded) == set(tensors)


@pytest.mark.parametrize("bad", ["\ud800", "a\udfffb"])
def test_save_refuses_lone_surrogates(tmp_path, bad):
    """A name or metadata the reference could not read is refused before
    anything is written (it raised UnicodeEncodeError mid-save before)."""
    path = tmp_path / "s.safetensors"
    for tensors, metadata in (({bad: np.ones(2)}, None), ({"a": np.ones(2)}, {bad: "v"}), ({"a": np.ones(2)}, {"k": bad})):
        with pytest.raises(mlxbuf.InvalidArgument) as excinfo:
            save_safetensors(path, tensors, metadata)
        assert_names(excinfo, "lone surrogate")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_header_readers_refuse(tmp_path, monkeypatch):
    """Readers refuse headers above 100 MB (MAX_HEADER_BYTES): so does the
    writer, before writing (shown with the limit lowered to 64 bytes)."""
    monkeypatch.setattr(mlxbuf.safetensors, "MAX_HEADER_BYTES", 64)
    path = tmp_path / "big.safetensors"
    with pytest.raises(mlxbuf.InvalidArgument) as excinfo:
        save_safetensors(path, {f"tensor{i}": np.ones(1) for i in range(4)})
    assert_names(excinfo, "64-byte limit", "4 tensors")
    assert list(tmp_path.iterdir()) == []


# ---- the parser against the reference on mutated files -------------------------------------


def _seed_file():
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int16),
               "e": np.zeros((0, 2), np.float64), "m": np.array([True, False])}
    return reference.save(tensors, metadata={"k": "v"})


SEED = _seed_file()


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(
    cut=st.integers(0, len(SEED) + 8),
    flips=st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(1, 255)), max_size=4),
    tail=st.binary(max_size=8),
)
def test_mutated_files_never_accepted_when_the_reference_refuses(tmp_path_factory, cut, flips, tail):
    """Byte flips, truncation and appended bytes: whenever the reference
    refuses a file, so do we (the other direction has the STRICTER
    exceptions); when both accept, they agree on names, dtypes and shapes."""
    data = bytearray(SEED[:cut])
    for pos, mask in flips:
        if pos < len(data):
            data[pos] ^= mask
    data = bytes(data) + tail
    tmp = tmp_path_factory.mktemp("mut")
    ours, loaded = we_accept(data, tmp, mlxbuf.Device("host"))
    if not reference_accepts(data, tmp):
        assert not ours, "accepted a file the reference refuses"
        return
    if ours:
        theirs = reference.load(data)
        assert set(theirs) == set(loaded)
        for name, buf in loaded.items():
            assert buf.shape == theirs[name].shape
            np.testing.assert_array_equal(buf.as_slice("u8"), theirs[name].reshape(-1).view(np.uint8))


def test_parse_header_on_bytes_matches_the_file_path():
    data = make({"a": F32, "z": entry(shape=[0], data_offsets=[8, 8])}, b"\0" * 8)
    header = parse_header(data, len(data))
    assert header.names == ["a", "z"] and header["z"].nbytes == 0
    assert [e.name for e in header.tensors] == ["a", "z"]
