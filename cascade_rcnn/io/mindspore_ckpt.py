"""Read and write MindSpore `.ckpt` files without MindSpore or protobuf: the wire format is parsed by hand.

A `.ckpt` is a concatenation of serialized `Checkpoint` messages, one record (`Value`) per tensor:

    Checkpoint  { repeated Value value = 1; }
    Value       { string tag = 1; TensorProto tensor = 2; MapTensorProto maptensor = 3; }
    TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }

`tensor_content` holds the little-endian C-order bytes; a tensor split over several consecutive records with the
same tag (MindSpore does this above 512 MiB) is the concatenation of their contents, and every slice carries the
full `dims`. A 0-d tensor is written with no `dims` (MindSpore 2.x) or with `dims == [0]` (1.x); both read as shape
`()`. See `shared/specs/mindspore_cascadercnn.md` §4 and `shared/reference/mindspore/README.md`.

Every malformed input raises `CheckpointError` naming the file and the record; lengths are checked against the
bytes that remain before anything is allocated, so a corrupt length can neither crash nor exhaust memory.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade_rcnn.errors import CheckpointError

# tensor_type -> little-endian storage dtype. Unsigned types were spelled "Uint*" by older MindSpore and "UInt*"
# by newer; both are accepted. BFloat16 is stored as its 16 raw bits and upcast to float32 after reading.
_STORAGE_DTYPES: dict[str, str] = {
    "Float16": "<f2", "Float32": "<f4", "Float64": "<f8", "BFloat16": "<u2", "Bool": "u1",
    "Int8": "i1", "Int16": "<i2", "Int32": "<i4", "Int64": "<i8",
    **{f"{spelling}{bits}": f"<u{bits // 8}" for spelling in ("UInt", "Uint") for bits in (8, 16, 32, 64)},
}
# numpy dtype -> tensor_type written by `write_mindspore_ckpt` (MindSpore 2.x spellings).
_TYPE_NAMES: dict[np.dtype, str] = {
    np.dtype(dt): name for name, dt in [
        ("Float16", "f2"), ("Float32", "f4"), ("Float64", "f8"), ("Bool", "?"), ("Int8", "i1"), ("Int16", "i2"),
        ("Int32", "i4"), ("Int64", "i8"), ("UInt8", "u1"), ("UInt16", "u2"), ("UInt32", "u4"), ("UInt64", "u8"),
    ]
}
# Training bookkeeping that is not a model parameter (spec §3.4): nn.SGD `accum.*` / `stat.*`, nn.Momentum
# `moments.*`, the optimizer scalars, and the `append_info` counters. `str` records are never parameters either.
_OPTIMIZER_PREFIXES = ("accum.", "stat.", "moments.")
_BOOKKEEPING_NAMES = frozenset({"global_step", "learning_rate", "momentum", "epoch_num", "step_num"})
_MAX_VARINT_BYTES = 10  # a 64-bit varint never needs more


def is_optimizer_state(name: str) -> bool:
    """True for optimizer state and training bookkeeping (`accum.*`, `stat.*`, `moments.*`, `global_step`, ...)."""
    return name.startswith(_OPTIMIZER_PREFIXES) or name in _BOOKKEEPING_NAMES


@dataclass(frozen=True)
class _Record:
    """One `Value` record: where its content lies in the file (`content_start`, `content_size` in bytes)."""

    index: int
    name: str
    tensor_type: str | None  # None for a MapTensor record (MapParameter), which this reader skips
    dims: tuple[int, ...]
    content_start: int
    content_size: int


class _Cursor:
    """A position in `buf[pos:end]`; every read is checked against `end` and raises `ValueError` past it."""

    def __init__(self, buf: mmap.mmap | bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def varint(self) -> int:
        """Read an unsigned varint (at most 10 bytes, value < 2**64)."""
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            if self.pos >= self.end:
                raise ValueError("truncated varint")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if value >= 1 << 64:
                    raise ValueError("varint overflows 64 bits")
                return value
        raise ValueError(f"varint longer than {_MAX_VARINT_BYTES} bytes")

    def key(self) -> tuple[int, int]:
        """Read a field key: (field number, wire type)."""
        key = self.varint()
        if key >> 3 == 0:
            raise ValueError("field number 0")
        return key >> 3, key & 7

    def span(self) -> tuple[int, int]:
        """Read a length prefix and skip the bytes it covers; return their (start, size)."""
        size = self.varint()
        if size > self.end - self.pos:
            raise ValueError(f"length {size} exceeds the {self.end - self.pos} bytes that remain")
        self.pos += size
        return self.pos - size, size

    def text(self) -> str:
        start, size = self.span()
        return bytes(self.buf[start:start + size]).decode("utf-8")  # UnicodeDecodeError is a ValueError

    def skip(self, wire: int) -> None:
        """Skip an unknown field's value by its wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)."""
        if wire == 0:
            self.varint()
        elif wire == 2:
            self.span()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if size > self.end - self.pos:
                raise ValueError("truncated fixed-size field")
            self.pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _parse_tensor(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """Parse a TensorProto spanning the whole cursor: (tensor_type, dims, content_start, content_size)."""
    dims: list[int] = []
    tensor_type, content = None, None
    while cur.pos < cur.end:
        field, wire = cur.key()
        if field == 1 and wire == 0:  # proto2 default: unpacked, one key per element
            dims.append(cur.varint())
        elif field == 1 and wire == 2:  # packed form, accepted as the spec asks
            start, size = cur.span()
            packed = _Cursor(cur.buf, start, start + size)
            while packed.pos < packed.end:
                dims.append(packed.varint())
        elif field == 2 and wire == 2:
            tensor_type = cur.text()
        elif field == 3 and wire == 2:
            content = cur.span()
        else:
            cur.skip(wire)
    if tensor_type is None or content is None:
        raise ValueError("tensor has no tensor_type" if tensor_type is None else "tensor has no tensor_content")
    # int64 dims arrive as two's-complement uint64; a negative one is corruption, not a shape.
    if any(d >= 1 << 63 for d in dims):
        raise ValueError(f"negative dimension in dims {[d - (1 << 64) if d >= 1 << 63 else d for d in dims]}")
    return tensor_type, tuple(dims), *content


def _peek_name(buf: mmap.mmap, start: int, end: int) -> str | None:
    """Best-effort tag of a record whose body runs past the end of the file, for the error message."""
    try:
        cur = _Cursor(buf, start, end)
        return cur.text() if cur.key() == (1, 2) else None
    except ValueError:
        return None


def _iter_records(buf: mmap.mmap, path: Path) -> Iterator[_Record]:
    """Walk the top-level `Checkpoint.value` fields of a mapped file, yielding one `_Record` per `Value`."""
    top = _Cursor(buf, 0, len(buf))
    index = 0
    while top.pos < top.end:
        name: str | None = None
        record_start = top.pos
        try:
            field, wire = top.key()
            if (field, wire) != (1, 2):
                top.skip(wire)  # not a Value: an unknown Checkpoint field
                continue
            try:
                start, size = top.span()
            except ValueError:
                name = _peek_name(buf, top.pos, top.end)  # top.pos is just past the length prefix here
                raise
            cur = _Cursor(buf, start, start + size)
            tensor = None
            maptensor = False
            while cur.pos < cur.end:
                field, wire = cur.key()
                if field == 1 and wire == 2:
                    name = cur.text()
                elif field == 2 and wire == 2:
                    if tensor is not None:
                        raise ValueError("record has two tensors")
                    t_start, t_size = cur.span()
                    tensor = _parse_tensor(_Cursor(buf, t_start, t_start + t_size))
                elif field == 3 and wire == 2:
                    cur.span()
                    maptensor = True
                else:
                    cur.skip(wire)
            if not name:
                raise ValueError("record has no tag (tensor name)")
            if tensor is None and not maptensor:
                raise ValueError("record has no tensor")
        except ValueError as error:
            label = f"record {index}" + (f" ({name!r})" if name else "") + f" at byte {record_start}"
            raise CheckpointError(f"{path}: {label}: {error}") from None
        if tensor is None:
            yield _Record(index, name, None, (), 0, 0)
        else:
            yield _Record(index, name, *tensor)
        index += 1
    if index == 0:
        raise CheckpointError(f"{path}: no records: not a MindSpore checkpoint")


def _decode(buf: mmap.mmap, records: list[_Record], path: Path) -> np.ndarray:
    """Turn the consecutive records of one tensor into an array (native byte order; BFloat16 upcast to float32)."""
    first = records[0]
    where = f"{path}: record {first.index} ({first.name!r})"
    if any((r.tensor_type, r.dims) != (first.tensor_type, first.dims) for r in records):
        raise CheckpointError(f"{where}: its slices disagree on tensor_type or dims")
    total = sum(r.content_size for r in records)
    if first.tensor_type == "str":  # append_info strings: numpy `<U{n}` bytes, i.e. UTF-32-LE
        storage, shape = "u1", (total,)
        if first.dims not in ((), (0,)) or total % 4:
            raise CheckpointError(f"{where}: malformed str record (dims {list(first.dims)}, {total} bytes)")
    else:
        storage = _STORAGE_DTYPES.get(first.tensor_type or "")
        if storage is None:
            raise CheckpointError(f"{where}: unsupported tensor_type {first.tensor_type!r}")
        itemsize = np.dtype(storage).itemsize
        # dims == [0] is MindSpore 1.x's spelling of a scalar; with no content it can only be an empty vector.
        shape = () if first.dims == (0,) and total == itemsize else first.dims
        expected = int(np.prod(shape, dtype=object)) * itemsize
        if expected != total:
            raise CheckpointError(f"{where}: dims {list(first.dims)} of {first.tensor_type} need {expected} bytes, "
                                  f"the content has {total}")
    # Validated above, so this allocation is bounded by the file size, whatever the header claimed.
    raw = np.empty(total, dtype=np.uint8)
    offset = 0
    for r in records:
        raw[offset:offset + r.content_size] = np.frombuffer(buf, np.uint8, r.content_size, r.content_start)
        offset += r.content_size
    if first.tensor_type == "str":
        try:
            return np.array(raw.tobytes().decode("utf-32-le"))
        except UnicodeDecodeError as error:
            raise CheckpointError(f"{where}: str content is not UTF-32: {error}") from None
    values = raw.view(storage).reshape(shape)
    if first.tensor_type == "BFloat16":  # the bfloat16 bits are the top half of a float32: exact upcast
        return (values.astype(np.uint32) << 16).view(np.float32)
    if first.tensor_type == "Bool":
        return values != 0  # any non-zero byte is True, as in C++; a numpy bool must hold 0 or 1
    return values.astype(values.dtype.newbyteorder("="), copy=False)


def _open_mapped(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise CheckpointError(f"{path}: empty file: not a MindSpore checkpoint")
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot open checkpoint ({error})") from None


def read_mindspore_ckpt(path: str | Path, *, include_optimizer: bool = False) -> dict[str, np.ndarray]:
    """Read a MindSpore `.ckpt` into `{name: array}` in file order.

    Arrays keep the stored dtype and shape (FC weights stay `[in, out]`), except `BFloat16`, which is returned as
    float32 (an exact upcast, since numpy has no bfloat16). `str` records become 0-d numpy unicode arrays.
    By default only model parameters are returned: optimizer state and bookkeeping (`is_optimizer_state`) and
    `str` records are skipped; `include_optimizer=True` returns every record. MapTensor records are always skipped.
    Raises `CheckpointError` for anything that is not a well-formed checkpoint.
    """
    path = Path(path)
    buf = _open_mapped(path)
    try:
        groups: list[list[_Record]] = []
        for record in _iter_records(buf, path):
            if groups and groups[-1][0].name == record.name:
                groups[-1].append(record)  # a slice of the same tensor
            else:
                groups.append([record])
        tensors: dict[str, np.ndarray] = {}
        for group in groups:
            first = group[0]
            if first.name in tensors:
                raise CheckpointError(f"{path}: record {first.index} ({first.name!r}): name repeated after other names")
            keep = include_optimizer or not (is_optimizer_state(first.name) or first.tensor_type == "str")
            if first.tensor_type is not None and keep:
                tensors[first.name] = _decode(buf, group, path)
        return tensors
    finally:
        buf.close()


def is_mindspore_ckpt(path: str | Path) -> bool:
    """Cheap content sniff: does the file start with a well-formed tensor record of a known tensor_type?

    Reads only the first record's header (the file is mapped, its tensor bytes are not touched), so it is
    fast for any size. Never raises: an unreadable file is simply not a checkpoint.
    """
    path = Path(path)
    try:
        buf = _open_mapped(path)
    except CheckpointError:
        return False
    try:
        first = next(_iter_records(buf, path))
        return first.tensor_type is None or first.tensor_type in _STORAGE_DTYPES or first.tensor_type == "str"
    except CheckpointError:
        return False
    finally:
        buf.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_mindspore_ckpt(path: str | Path, tensors: Mapping[str, np.ndarray],
                         *, max_record_bytes: int = 512 * 2**20) -> None:
    """Write `{name: array}` as MindSpore 2.x's `save_checkpoint` does (0-d without dims, "UInt*" spellings).

    A tensor above `max_record_bytes` is split over consecutive records with the same tag, as MindSpore does at
    512 MiB; a smaller limit exercises that path in tests. 0-d numpy unicode arrays are written as `str` records.
    bfloat16 cannot be written (numpy has no such dtype).
    """
    with open(path, "wb") as file:
        for name, array in tensors.items():
            array = np.asarray(array)
            if array.dtype.kind == "U":
                dims, type_name, chunks = [0], "str", [str(array.item()).encode("utf-32-le")]
            else:
                type_name = _TYPE_NAMES.get(array.dtype.newbyteorder("="))
                if type_name is None:
                    raise ValueError(f"{name}: dtype {array.dtype} has no MindSpore tensor_type")
                little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                dims = list(array.shape)
                parts = max(1, min(little.size, -(-little.nbytes // max_record_bytes)))  # no empty slices
                chunks = [part.tobytes() for part in np.array_split(little.reshape(-1), parts)]
            header = b"".join(_varint(1 << 3) + _varint(d) for d in dims) + _field(2, type_name.encode())
            for chunk in chunks:
                value = _field(1, name.encode()) + _field(2, header + _field(3, chunk))
                file.write(_field(1, value))
