"""The C header scanner (the fast path) against the Python parser.

The scanner must accept nothing the Python parser refuses, and what it
accepts it must read exactly as the Python parser does; anything else it
hands to the Python parser. Every header here goes through both
(``mlxbuf.safetensors._FAST_SCAN`` switches the scanner off).
"""

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlxbuf
from mlxbuf import safetensors as S
from mlxbuf._cmetal import ffi, lib
from support import fuzz_examples

DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
          "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def both(data):
    """(outcome of the C scanner path, outcome of the Python path): the
    header's fields, or the error message."""
    results = []
    for fast in (True, False):
        S._FAST_SCAN = fast
        try:
            h = S.parse_header(data, len(data))
        except S.SafetensorsError as exc:
            results.append(("error", str(exc)))
        else:
            results.append(("ok", (h.names, h.dtypes, h.shapes, h.begins, h.ends, h.metadata)))
        finally:
            S._FAST_SCAN = True
    return results


def scanned(data):
    """Whether the C scanner itself accepts the header of these bytes."""
    (n,) = struct.unpack_from("<Q", data)
    out = ffi.new("cm_safetensors_scan_t **")
    raw = data[8 : 8 + n]
    status = lib.cm_safetensors_scan(ffi.from_buffer(raw), len(raw), 8 + n, len(data) - 8 - n, out)
    lib.cm_safetensors_scan_release(out[0])
    return status == 0


def file_of(header_text, data_len):
    text = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(text)) + text + b"\0" * data_len


@st.composite
def headers(draw):
    """A header text (usually valid, in varied JSON spellings) and its data length."""
    count = draw(st.integers(0, 6))
    names = draw(st.lists(st.text(min_size=0, max_size=6), min_size=count, max_size=count, unique=True))
    dtypes = [draw(st.sampled_from(list(DTYPES) * 8 + ["F8_E4M3", "f32"])) for _ in names]
    if draw(st.integers(0, 3)):  # usually laid out as writers do: aligned by decreasing element size
        dtypes.sort(key=lambda d: -DTYPES.get(d, 1))
    entries = []
    pos = 0
    for name, dtype in zip(names, dtypes):
        size = DTYPES.get(dtype, 1)
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = int(np.prod(shape)) * size
        info = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        keys = draw(st.permutations(["dtype", "shape", "data_offsets"]))
        entries.append((name, {k: info[k] for k in keys}))
        pos += n
    if draw(st.booleans()):
        meta = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)))
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", meta))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",\n", " :\t")]))
    text = "{" + separators[0].join(
        json.dumps(k, ensure_ascii=draw(st.booleans())) + separators[1] + json.dumps(v, separators=separators)
        for k, v in entries
    ) + "}"
    text = draw(st.sampled_from(["", " ", "\n"])) + text
    if draw(st.integers(0, 3)):  # usually padded so that the data section is 8-aligned
        text += " " * (-len(text.encode()) % 8)
    data_len = pos + (draw(st.sampled_from([1, 8])) if not draw(st.integers(0, 9)) else 0)
    return text, data_len


EDITS = st.lists(st.tuples(st.integers(0, 400), st.sampled_from(
    [b"", b" ", b"\\", b'"', b"0", b"-", b".5", b"e3", b"[", b"]", b"{", b"}", b",", b":", b"\x00", b"\x1f",
     b"\xc3\xa9", b"null", b"\\ud800", b"99999999999999999999"])), max_size=3)


@settings(max_examples=fuzz_examples(300), suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(case=headers(), edits=st.one_of(st.just([]), EDITS))
def test_scanner_and_parser_agree(case, edits):
    text, data_len = case
    raw = bytearray(text.encode())
    for pos, insert in edits:
        pos %= len(raw) + 1
        raw[pos : pos + (1 if insert == b"" else 0)] = insert
    data = file_of(bytes(raw), data_len)
    fast, slow = both(data)
    assert fast == slow


def test_the_usual_header_takes_the_fast_path():
    arrays = {"w": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.int64), "é": np.zeros(0, np.uint8)}
    import safetensors.numpy as reference

    data = reference.save(arrays, metadata={"format": "np", "note": "ünï\\n"})
    assert scanned(data)
    fast, slow = both(data)
    assert fast == slow and fast[0] == "ok"
    assert fast[1][5] == {"format": "np", "note": "ünï\\n"}


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"a\\u0041":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "escape in a name"),
        ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}', "extra key"),
        ('{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}', "a float"),
        ('{"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
         "out of file order"),
        ('{"__metadata__":{"k":{"n":"v"}}}', "nested metadata"),
    ],
)
def test_unusual_but_valid_headers_take_the_python_path(text, why):
    data_len = 2 if "[1,2]" in text else 1 if "[0,1]" in text else 0
    data = file_of(text.ljust(-(-len(text) // 8) * 8), data_len)
    assert not scanned(data), why
    fast, slow = both(data)
    assert fast == slow


def test_dtype_names_match_the_python_table():
    names = [ffi.string(lib.cm_safetensors_dtype_name(i)).decode() for i in range(lib.CM_SAFETENSORS_DTYPE_COUNT)]
    assert sorted(names) == sorted(S.SAFETENSORS_DTYPES)
    assert lib.cm_safetensors_dtype_name(lib.CM_SAFETENSORS_DTYPE_COUNT) == ffi.NULL
    for name, dt in S.SAFETENSORS_DTYPES.items():
        size = dt.size
        ok = file_of(json.dumps({"a": {"dtype": name, "shape": [3], "data_offsets": [0, 3 * size]}}).ljust(64), 3 * size)
        assert scanned(ok)
        bad = file_of(json.dumps({"a": {"dtype": name, "shape": [3], "data_offsets": [0, 3 * size + 1]}}).ljust(64),
                      3 * size + 1)
        assert not scanned(bad)


def test_loading_is_the_same_either_way(tmp_path):
    arrays = {f"t{i}": (np.arange(i * 3) % 7).astype(np.float32).reshape(i, 3) for i in range(6)}
    path = tmp_path / "m.safetensors"
    S.save_safetensors(path, arrays, metadata={"k": "v"})
    dev = mlxbuf.Device("host")
    try:
        S._FAST_SCAN = False
        slow = S.load_safetensors(path, dev)
    finally:
        S._FAST_SCAN = True
    fast = S.load_safetensors(path, dev)
    assert list(fast) == list(slow)
    for name in fast:
        assert (fast[name].dtype, fast[name].shape, fast[name].byte_offset) == (
            slow[name].dtype, slow[name].shape, slow[name].byte_offset)
        np.testing.assert_array_equal(fast[name].numpy(), arrays[name])
