"""Element types: the DType enum, its spellings, and their numpy / DLPack equivalents."""

from __future__ import annotations

import enum
from typing import Any, TypeAlias, Union

import numpy as np

from mlxbuf.errors import UnsupportedDtype

__all__ = [
    "DType",
    "DTypeLike",
    "as_dtype",
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "bool_",
]

# DLPack type codes (dlpack.h, DLDataTypeCode).
kDLInt = 0
kDLUInt = 1
kDLFloat = 2
kDLBfloat = 4
kDLBool = 6


class DType(enum.Enum):
    """The element type of a Buffer.

    ``str(dt)`` and ``dt.name`` give the short name (``"f32"``),
    ``dt.long_name`` the long one (``"float32"``), ``dt.size`` the bytes per
    element, ``dt.numpy`` the numpy dtype (BF16 needs ml_dtypes) and
    ``dt.dlpack`` the DLPack ``(code, bits, lanes)``.
    Members are immutable singletons, safe to share between threads.
    """

    #     short   size long name  DLPack code
    F32 = ("f32", 4, "float32", kDLFloat)
    F16 = ("f16", 2, "float16", kDLFloat)
    BF16 = ("bf16", 2, "bfloat16", kDLBfloat)
    U8 = ("u8", 1, "uint8", kDLUInt)
    U16 = ("u16", 2, "uint16", kDLUInt)
    U32 = ("u32", 4, "uint32", kDLUInt)
    I32 = ("i32", 4, "int32", kDLInt)
    I8 = ("i8", 1, "int8", kDLInt)
    I16 = ("i16", 2, "int16", kDLInt)
    I64 = ("i64", 8, "int64", kDLInt)
    U64 = ("u64", 8, "uint64", kDLUInt)
    F64 = ("f64", 8, "float64", kDLFloat)
    BOOL = ("bool", 1, "bool", kDLBool)

    # Set on each member by __new__ (annotations only: not members).
    size: int
    long_name: str
    dlpack_code: int
    bits: int

    def __new__(cls, short: str, size: int, long_name: str, dlpack_code: int) -> DType:
        member = object.__new__(cls)
        member._value_ = short
        member.size = size
        member.long_name = long_name
        member.dlpack_code = dlpack_code
        member.bits = size * 8
        return member

    @property
    def name(self) -> str:
        """The short name, e.g. ``"f32"``."""
        return self._value_

    @property
    def itemsize(self) -> int:
        """Bytes per element (numpy's spelling of ``size``)."""
        return self.size

    @property
    def dlpack(self) -> tuple[int, int, int]:
        """DLPack ``(type code, bits, lanes)`` of this dtype."""
        return (self.dlpack_code, self.bits, 1)

    @property
    def numpy(self) -> np.dtype[Any]:
        """The numpy dtype; BF16 needs the ml_dtypes package (UnsupportedDtype otherwise)."""
        found = _NUMPY.get(self)
        if found is None:
            found = _bfloat16_numpy()
        return found

    def __str__(self) -> str:
        return self._value_

    def __repr__(self) -> str:
        return f"mlxbuf.{self.long_name if self is not DType.BOOL else 'bool_'}"


# What every function taking a dtype accepts: a DType, its short or long
# name, or a numpy dtype or scalar type (np.float32, ml_dtypes.bfloat16).
DTypeLike: TypeAlias = Union[DType, str, "np.dtype[Any]", type]


def _bfloat16_numpy() -> np.dtype[Any]:
    try:
        import ml_dtypes
    except ImportError:
        raise UnsupportedDtype(
            "bf16 has no numpy dtype without the ml_dtypes package (pip install ml_dtypes)"
        ) from None
    dt = np.dtype(ml_dtypes.bfloat16)
    _NUMPY[DType.BF16] = dt
    _LOOKUP.setdefault(dt, DType.BF16)
    _LOOKUP.setdefault(ml_dtypes.bfloat16, DType.BF16)
    return dt


_NUMPY: dict[DType, np.dtype[Any]] = {dt: np.dtype(dt.long_name) for dt in DType if dt is not DType.BF16}

# Every accepted spelling -> DType, so the allocation hot path is one dict
# lookup. numpy dtypes and scalar types hash differently from strings, so
# they share the table.
_LOOKUP: dict[Any, DType] = {}
for _dt in DType:
    _LOOKUP[_dt] = _dt
    _LOOKUP[_dt._value_] = _dt
    _LOOKUP[_dt.long_name] = _dt
for _dt, _np in _NUMPY.items():
    _LOOKUP[_np] = _dt
    _LOOKUP[_np.type] = _dt
_LOOKUP["bool_"] = DType.BOOL
del _dt, _np

_ACCEPTED = ", ".join(f"{dt._value_}/{dt.long_name}" if dt.long_name != dt._value_ else dt._value_ for dt in DType)


def as_dtype(x: DTypeLike) -> DType:
    """The DType for ``x``: a DType, a short or long name, or a numpy dtype/type.

    Raises UnsupportedDtype naming ``x`` and listing the accepted names.
    """
    try:
        found = _LOOKUP.get(x)
    except TypeError:  # unhashable
        found = None
    if found is not None:
        return found
    return _as_dtype_slow(x)


def _as_dtype_slow(x: Any) -> DType:
    if isinstance(x, str) and x.lower() in _LOOKUP:
        return _LOOKUP[x.lower()]
    # None, bools and numbers are not dtypes, though np.dtype accepts some.
    if x is not None and not isinstance(x, (bool, int, float)):
        try:
            dt = np.dtype(x)
        except (TypeError, ValueError):
            dt = None
        if dt is not None:
            if dt.name == "bfloat16":
                return DType.BF16
            found = _LOOKUP.get(dt)
            if found is not None:
                return found
    raise UnsupportedDtype(f"unsupported dtype {x!r}; accepted: {_ACCEPTED} (or the numpy equivalents)")


float32 = DType.F32
float16 = DType.F16
bfloat16 = DType.BF16
float64 = DType.F64
uint8 = DType.U8
uint16 = DType.U16
uint32 = DType.U32
uint64 = DType.U64
int8 = DType.I8
int16 = DType.I16
int32 = DType.I32
int64 = DType.I64
bool_ = DType.BOOL
