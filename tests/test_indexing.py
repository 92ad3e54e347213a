"""Buffer indexing and iteration on the first axis, checked against numpy."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlxbuf
from mlxbuf import DType
from support import assert_names


def filled(device, shape, dtype="i32", offset_elements=0):
    """A Buffer of ``shape`` holding 0, 1, 2, ... that starts ``offset_elements``
    into its allocation, and the numpy array it must match."""
    dt = mlxbuf.as_dtype(dtype)
    count = int(np.prod(shape))
    base = device.alloc_buffer((count + offset_elements + 3) * dt.size, dt, (count + offset_elements + 3,))
    view = base.slice_view(offset_elements * dt.size, count).view(dt, shape)
    expected = np.arange(count, dtype=dt.numpy).reshape(shape)
    view.numpy()[...] = expected
    return view, expected


SLICES = [
    slice(None), slice(2, 5), slice(-3, None), slice(None, -1), slice(-100, 100), slice(4, 2), slice(7, 7),
    slice(None, None, 1), slice(np.int64(1), np.int32(3)), slice(10, 20),
]


@pytest.mark.parametrize("key", SLICES, ids=repr)
@pytest.mark.parametrize("shape", [(6,), (6, 4), (6, 2, 3)], ids=str)
def test_slices_are_zero_copy_views_matching_numpy(device, shape, key):
    buf, expected = filled(device, shape, offset_elements=5)
    part = buf[key]
    want = expected[key]
    assert isinstance(part, mlxbuf.Buffer)
    assert part.shape == want.shape and part.dtype is buf.dtype
    np.testing.assert_array_equal(part.numpy(), want)
    start = key.indices(shape[0])[0]
    row_bytes = buf.nbytes // shape[0]
    assert part.byte_offset == buf.byte_offset + start * row_bytes
    assert part.byte_len == buf.byte_len and part.contents_ptr == buf.contents_ptr
    if part.nbytes:
        part.numpy()[...] = -1  # writes land in the original
        assert (buf.numpy()[key] == -1).all()


@given(n=st.integers(0, 12), start=st.none() | st.integers(-20, 20), stop=st.none() | st.integers(-20, 20))
def test_any_step_one_slice_matches_numpy(n, start, stop):
    device = mlxbuf.default_device()
    buf = device.alloc_buffer(max(n, 1) * 2, "u16", (n,))
    buf.numpy()[:] = np.arange(n)
    got = buf[start:stop]
    want = np.arange(n, dtype=np.uint16)[start:stop]
    assert got.shape == want.shape
    assert got.numpy().tolist() == want.tolist()


def test_integer_index_of_a_1d_buffer_is_a_numpy_scalar(device):
    buf, expected = filled(device, (5,), "f32", offset_elements=3)
    for i in (0, 2, 4, -1, -5, np.int64(3), np.uint8(1)):
        value = buf[i]
        assert type(value) is np.float32 and value == expected[i]
    # A scalar is a copy of the value, as in numpy.
    value = buf[1]
    buf.numpy()[1] = 99
    assert value == 1


def test_integer_index_of_an_nd_buffer_is_a_row_view(device):
    buf, expected = filled(device, (4, 3, 2), "u8", offset_elements=7)
    row = buf[-2]
    assert isinstance(row, mlxbuf.Buffer) and row.shape == (3, 2)
    assert row.byte_offset == buf.byte_offset + 2 * 6
    np.testing.assert_array_equal(row.numpy(), expected[-2])
    assert buf[1][2][1] == expected[1, 2, 1]
    row.numpy()[0, 0] = 200
    assert buf.numpy()[2, 0, 0] == 200


@pytest.mark.parametrize("index", [5, -6, 1 << 70], ids=str)
def test_out_of_range_is_an_index_error_naming_index_and_size(device, index):
    buf, _ = filled(device, (5, 2))
    with pytest.raises(IndexError) as exc:
        buf[index]
    assert isinstance(exc.value, mlxbuf.IndexOutOfBounds) and isinstance(exc.value, mlxbuf.MlxError)
    assert_names(exc, index, "size 5")
    with pytest.raises(IndexError):
        np.arange(10).reshape(5, 2)[index]  # numpy agrees


UNSUPPORTED = [
    ("step 2", slice(None, None, 2)),
    ("step -1", slice(None, None, -1)),
    ("step 0", slice(None, None, 0)),
    ("float bound", slice(1.5, 3)),
    ("tuple", (1, 0)),
    ("empty tuple", ()),
    ("Ellipsis", Ellipsis),
    ("None", None),
    ("bool", True),
    ("numpy bool", np.bool_(False)),
    ("list", [0, 1]),
    ("index array", np.array([0, 1])),
    ("float", 1.0),
    ("str", "0"),
]


@pytest.mark.parametrize("key", [u[1] for u in UNSUPPORTED], ids=[u[0] for u in UNSUPPORTED])
def test_anything_else_is_refused_pointing_at_numpy(device, key):
    buf, _ = filled(device, (4, 2))
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        buf[key]
    assert_names(exc, repr(key), "buf.numpy()")


def test_iteration_walks_the_first_axis(device):
    flat, expected = filled(device, (4,), "i64", offset_elements=1)
    items = list(flat)
    assert items == expected.tolist() and all(type(x) is np.int64 for x in items)
    grid, expected = filled(device, (3, 2), "i16", offset_elements=2)
    rows = list(grid)
    assert [r.shape for r in rows] == [(2,)] * 3
    assert [r.numpy().tolist() for r in rows] == expected.tolist()
    assert [r.contents_ptr for r in rows] == [grid.contents_ptr] * 3
    assert len(grid) == 3 and 3 in flat and 4 not in flat  # `in` goes through iteration
    empty = device.alloc_buffer(8, "f32", (0, 2))
    assert len(empty) == 0 and list(empty) == []


def test_zero_d_buffers_behave_like_zero_d_arrays(device):
    # numpy: len() and iteration of a 0-d array raise TypeError, indexing it
    # with an integer or a slice raises IndexError.
    scalar = device.alloc_buffer(4, "f32", ())
    scalar.numpy()[()] = 2.5
    assert scalar.shape == () and scalar.ndim == 0 and scalar.element_count == 1
    with pytest.raises(TypeError, match="0-d"):
        len(scalar)
    with pytest.raises(TypeError, match="0-d"):
        iter(scalar)
    for key in (0, slice(None)):
        with pytest.raises(mlxbuf.IndexOutOfBounds, match="0-d"):
            scalar[key]
    assert scalar.numpy()[()] == 2.5


def test_bf16_elements(device):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    buf = device.alloc_buffer(8, DType.BF16, (4,))
    buf.numpy()[:] = np.array([1, 2, 3, 4], dtype=ml_dtypes.bfloat16)
    assert float(buf[2]) == 3.0 and [float(x) for x in buf] == [1, 2, 3, 4]
