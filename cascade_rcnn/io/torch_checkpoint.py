"""Read PyTorch checkpoints of the peer projects (mmdetection, detectron2) without running code from the file.

Two entry points:

- `read_torch_checkpoint(path)` returns `(state_dict, meta)`: the tensors of the model and the plain values of the
  checkpoint's metadata. It accepts
    * mmdetection files (mmcv / mmengine `save_checkpoint`): `{'state_dict': ..., 'meta': ..., 'optimizer': ...}`;
      `meta['CLASSES']` (mmdet 2.x) or `meta['dataset_meta']['classes']` (mmdet 3.x) survive when present;
    * detectron2 trainer files (`Checkpointer.save`): `{'model': state_dict, 'optimizer': ..., 'iteration': ...}`;
      `meta` then holds the top-level plain values (e.g. `iteration`);
    * a bare state_dict.
- `sniff_checkpoint_format(path)` names any weights file's format from its first bytes (safetensors, torch, pickle,
  MindSpore): the one format sniffer of the package, on which `cascade_rcnn.io.weights.load_checkpoint` dispatches.

Reading is done in two steps. First `torch.load(..., weights_only=True)`, PyTorch's own allow-list unpickler. Old
checkpoints often carry objects it refuses (numpy scalars in `meta`, an mmcv `ConfigDict`, mmengine's `MessageHub`
state), so when it refuses, `restricted_torch_load` reads the file again with an unpickler of our own that admits only
tensor and storage reconstruction, `OrderedDict`, plain containers and `_codecs.encode` (how protocol 2 writes
`bytes`). Every other global becomes an inert placeholder class: it is never imported, and "calling" it only records
its arguments. A crafted `__reduce__` (`os.system`, `builtins.eval`, ...) therefore produces a placeholder, not a call.
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.mindspore_ckpt import is_mindspore_ckpt

logger = logging.getLogger(__name__)

# The first pickle of a legacy (pre-1.6, non-zip) `torch.save` file is this integer (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
# Upper bound on a safetensors JSON header; the format itself caps it at 100 MB.
_SAFETENSORS_MAX_HEADER = 100_000_000

# `torch.<Name>Storage` globals name the element type of a storage in both the zip and the legacy format.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}
# `torch.float32` etc. are pickled as the global `torch float32` (they appear as arguments of _rebuild_tensor_v3).
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype for dtype in {*_STORAGE_DTYPES.values(), torch.uint16, torch.uint32}
}


class _StorageType:
    """What the unpickler returns for a `torch.<Name>Storage` global: only its element type is used."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    """One storage record of the file, read as a flat tensor of its element type."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class InertObject:
    """Stands in for an object of a class the restricted reader refuses to import.

    Subclasses are made per refused global (`module.name` in `refused_global`). Constructing one, in any of the ways a
    pickle can (REDUCE, NEWOBJ, BUILD, SETITEMS, APPENDS), only records what it was given; nothing runs.
    """

    refused_global: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = super().__new__(cls)
        obj.__dict__.update(_args=args, _state=None, _items={}, _list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["_list"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_list"].extend(values)

    def __repr__(self) -> str:
        return f"<refused {self.refused_global}>"


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it to write `bytes`; only the text codecs they use are accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CheckpointError(f"refused _codecs.encode with arguments of type {type(text).__name__}, {encoding!r}")
    return text.encode(encoding)


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    """Tensor view of a storage, the role of torch._utils._rebuild_tensor{,_v2}; hooks and metadata are ignored.

    `as_strided` checks that the view fits in the storage, so a crafted size or offset cannot read outside it.
    """
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuilt from a {type(storage).__name__}, not from a storage record")
    if not (isinstance(storage_offset, int) and _is_int_tuple(size) and _is_int_tuple(stride)):
        raise CheckpointError("tensor rebuilt with a non-integer size, stride or offset")
    return storage.flat.as_strided(size, stride, storage_offset)


def _rebuild_tensor_v3(
    storage: _Storage,
    storage_offset: int,
    size: tuple,
    stride: tuple,
    requires_grad: bool,
    backward_hooks: Any,
    dtype: torch.dtype,
    *_: Any,
) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v3: an untyped (byte) storage viewed with the element type `dtype`."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise CheckpointError("malformed _rebuild_tensor_v3 record")
    flat = storage.flat if storage.flat.dtype == dtype else storage.flat.view(torch.uint8).view(dtype)
    return _rebuild_tensor(_Storage(flat), storage_offset, size, stride)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    """torch._utils._rebuild_parameter{,_with_state}: a parameter is read as its plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter rebuilt from a {type(data).__name__}, not from a tensor")
    return data


def _rebuild_from_type(func: Callable[..., Any], _new_type: Any, args: tuple, _state: Any) -> torch.Tensor:
    """torch._tensor._rebuild_from_type_v2 (a tensor that carried Python attributes): rebuilt as a plain tensor.

    The type and the attributes are dropped; `func` must be one of our own tensor rebuilders.
    """
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter) or not isinstance(args, tuple):
        raise CheckpointError(f"_rebuild_from_type_v2 with an unexpected rebuild function {func!r:.80}")
    return func(*args)


def _torch_size(dims: Any = ()) -> tuple:
    """torch.Size, read as a plain tuple."""
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else None
    if not _is_int_tuple(dims):
        raise CheckpointError("torch.Size with non-integer entries")
    return dims


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) for v in value)


# The only globals the restricted reader hands out as real callables. Each one builds a tensor or a plain container
# and validates its arguments; none can reach the file system, the interpreter or an import.
_ADMITTED: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): _torch_size,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


def _load_build(unpickler: pickle._Unpickler) -> None:
    """The BUILD opcode (set an object's state), allowed on placeholders only.

    Plain BUILD would set attributes on whatever object is on the stack, including our own rebuild functions and
    storage records; nothing in a real checkpoint needs that, so it is refused.
    """
    state = unpickler.stack.pop()
    target = unpickler.stack[-1]
    if not isinstance(target, InertObject):
        raise CheckpointError(f"refused to set the state of a {type(target).__name__}")
    target.__setstate__(state)


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler of torch checkpoints that only builds tensors and containers (see the module docstring).

    It extends the pure-Python unpickler: that one lets us replace the BUILD opcode, and its speed does not matter
    because the tensor data lives outside the pickle.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, file: io.BufferedIOBase, load_storage: Callable[[str, torch.dtype, int], _Storage]) -> None:
        super().__init__(file, encoding="latin1")
        self._load_storage = load_storage
        self._inert_types: dict[str, type[InertObject]] = {}

    @property
    def refused_globals(self) -> list[str]:
        return sorted(self._inert_types)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ADMITTED:
            return _ADMITTED[(module, name)]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        full_name = f"{module}.{name}"
        if full_name not in self._inert_types:
            self._inert_types[full_name] = type(f"Inert[{full_name}]", (InertObject,), {"refused_global": full_name})
        return self._inert_types[full_name]

    def persistent_load(self, pid: Any) -> Any:
        # zip format: ('storage', type, key, location, numel); legacy: the same plus view_metadata.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise CheckpointError(f"unsupported persistent record {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise CheckpointError(f"storage record of unknown type {storage_type!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError("legacy storage views (torch < 0.4 files) are not supported")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        return self._load_storage(key, storage_type.dtype, numel)


def restricted_torch_load(path: str | Path) -> Any:
    """Unpickle a `torch.save` file (zip or legacy format) admitting only tensors and plain containers.

    Returns the unpickled object with tensors on the CPU; objects of other classes are `InertObject`s. Raises
    `CheckpointError` (naming the file) for anything that is not a readable torch file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head == _ZIP_MAGIC:
                return _load_zip(f)
            return _load_legacy(f)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError, TypeError, RuntimeError, AttributeError, KeyError, IndexError,
            pickle.UnpicklingError, zipfile.BadZipFile, struct.error, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _load_zip(f: io.BufferedIOBase) -> Any:
    """The zip format (torch >= 1.6): `<dir>/data.pkl` plus one `<dir>/data/<key>` record per storage."""
    with zipfile.ZipFile(f) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise CheckpointError("zip file without a data.pkl record (not a torch.save file)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder_name = prefix + "byteorder"
        # Files without the record predate it and were written little-endian.
        byteorder = zf.read(byteorder_name).decode() if byteorder_name in zf.namelist() else "little"
        storages: dict[str, _Storage] = {}

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            if key not in storages:
                raw = zf.read(f"{prefix}data/{key}")
                storages[key] = _Storage(_tensor_from_bytes(raw, dtype, numel, byteorder))
            return storages[key]

        unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), load_storage)
        result = unpickler.load()
    _log_refused(unpickler)
    return result


def _load_legacy(f: io.BufferedIOBase) -> Any:
    """The legacy format (torch < 1.6): magic, version, sys_info, the object pickle, the storage keys, raw storages.

    Each raw storage is an int64 element count followed by the elements, little-endian, in the order of the sorted
    keys. Storages are created empty while the object pickle is read and filled afterwards, as torch does.
    """
    if _RestrictedUnpickler(f, _no_storage).load() != _LEGACY_MAGIC_NUMBER:
        raise CheckpointError("not a torch.save file (no zip header and no legacy magic number)")
    if _RestrictedUnpickler(f, _no_storage).load() != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointError("unsupported legacy torch protocol version")
    _RestrictedUnpickler(f, _no_storage).load()  # sys_info: endianness and type sizes, always little-endian in practice
    pending: dict[str, tuple[torch.dtype, int]] = {}
    storages: dict[str, _Storage] = {}

    def load_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
        if key not in storages:
            pending[key] = (dtype, numel)
            storages[key] = _Storage(torch.empty(numel, dtype=dtype))
        return storages[key]

    unpickler = _RestrictedUnpickler(f, load_storage)
    result = unpickler.load()
    keys = _RestrictedUnpickler(f, _no_storage).load()
    if not (isinstance(keys, list) and all(isinstance(k, (str, bytes)) for k in keys)):
        raise CheckpointError("malformed storage key list")
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if key not in pending:
            raise CheckpointError(f"storage {key!r} is listed but not used")
        dtype, numel = pending[key]
        (count,) = struct.unpack("<q", f.read(8))
        if count != numel:
            raise CheckpointError(f"storage {key!r} holds {count} elements, the tensors expect {numel}")
        raw = f.read(numel * _element_size(dtype))
        storages[key].flat.copy_(_tensor_from_bytes(raw, dtype, numel, "little"))
    _log_refused(unpickler)
    return result


def _no_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
    raise CheckpointError("storage record outside the object pickle")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tensor_from_bytes(raw: bytes, dtype: torch.dtype, numel: int, byteorder: str) -> torch.Tensor:
    """A flat tensor of `numel` elements of `dtype` from the raw bytes of one storage record."""
    size = _element_size(dtype)
    if len(raw) != numel * size:
        raise CheckpointError(f"storage record of {len(raw)} bytes, expected {numel} x {size}")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # bytearray: frombuffer wants a writable buffer
    if byteorder != sys.byteorder and size > 1:
        data = data.view(numel, size).flip(1).reshape(-1)
    return data.view(dtype)


def _log_refused(unpickler: _RestrictedUnpickler) -> None:
    if unpickler.refused_globals:
        logger.info("skipped objects of refused classes: %s", ", ".join(unpickler.refused_globals))


def read_torch_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the model tensors and the plain metadata of a PyTorch checkpoint, never running code from the file.

    Args:
        path: a `torch.save` file (zip or legacy format) from mmdetection, detectron2's trainer, or a bare state_dict.

    Returns:
        `(state_dict, meta)`. `state_dict` maps names to CPU tensors (plain tensors, not parameters), in file order;
        entries that are not tensors are dropped. `meta` holds only plain values (str, numbers, bool, None, and
        lists/tuples/dicts of them): for mmdetection the `meta` dict, for detectron2 the top-level values besides the
        model, optimizer and scheduler, else `{}`. Objects of refused classes that behaved like a mapping (e.g. an
        mmcv `ConfigDict`) keep their items as a dict; other objects, numpy scalars and tensors are dropped.

    Raises:
        CheckpointError: the file is missing, is not a torch file, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    file_format = sniff_checkpoint_format(path)
    if file_format != "torch":
        hint = " (a detectron2 model-zoo .pkl? use read_detectron2_pkl)" if file_format == "pickle" else ""
        raise CheckpointError(f"{path}: this is a {file_format} file, not a PyTorch checkpoint{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal or failure of torch's reader sends us to our own
        logger.info("%s: torch.load(weights_only=True) refused (%s); reading tensors only", path, str(e)[:200])
        obj = restricted_torch_load(path)
    return _split_checkpoint(obj, path)


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Find the state_dict and the metadata in an unpickled checkpoint (see `read_torch_checkpoint`)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the checkpoint is a {_type_name(obj)}, expected a dict of tensors")
    meta: Any
    if isinstance(obj.get("state_dict"), dict):  # mmcv / mmengine save_checkpoint
        weights, meta = obj["state_dict"], obj.get("meta", {})
    elif isinstance(obj.get("model"), dict):  # detectron2 Checkpointer.save
        weights = obj["model"]
        meta = {k: v for k, v in obj.items() if k not in ("model", "optimizer", "scheduler")}
    else:
        weights, meta = obj, {}
    state_dict = {k: v.detach() for k, v in weights.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    plain_meta = _plain(meta)
    return state_dict, plain_meta if isinstance(plain_meta, dict) else {}


_DROP = object()


def _plain(value: Any) -> Any:
    """`value` with everything but plain Python values removed; `_DROP` when nothing plain is left."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, InertObject):
        # A refused mapping or sequence class (mmcv ConfigDict, addict.Dict, ...) filled itself via SETITEMS/APPENDS.
        if value._items:
            return _plain(dict(value._items))
        if value._list:
            return _plain(list(value._list))
        return _DROP
    if isinstance(value, dict):
        pairs = ((_plain(k), _plain(v)) for k, v in value.items())
        return {k: v for k, v in pairs if k is not _DROP and v is not _DROP and _is_hashable(k)}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [p for p in map(_plain, value) if p is not _DROP]
        if isinstance(value, (set, frozenset)):
            return frozenset(p for p in items if _is_hashable(p))
        return tuple(items) if isinstance(value, tuple) else items
    return _DROP


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _type_name(obj: Any) -> str:
    return obj.refused_global if isinstance(obj, InertObject) else type(obj).__name__


def _has_json_header(path: Path, header_len: int) -> bool:
    """Whether the `header_len` bytes after the first 8 of `path` are a JSON object (a safetensors header)."""
    import json

    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(header_len)
    try:
        return len(header) == header_len and isinstance(json.loads(header), dict)
    except ValueError:  # also UnicodeDecodeError
        return False


def sniff_checkpoint_format(path: str | Path) -> str:
    """Name a weights file's format from its content, not its suffix.

    Returns:
        'torch' (a `torch.save` zip with a data.pkl record, or the legacy format's magic number), 'pickle' (any other
        pickle, e.g. a detectron2 model-zoo .pkl), 'safetensors' (8-byte little-endian header length, then '{'; a
        header longer than the file is still 'safetensors', so that a cut download gets the safetensors reader's
        error), 'mindspore' (as `cascade_rcnn.io.mindspore_ckpt.is_mindspore_ckpt` decides) or 'unknown'.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("/data.pkl") for n in zf.namelist()):
                    return "torch"
        except zipfile.BadZipFile:
            pass
        return "unknown"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        # Before the pickle check: safetensors pads its header to a multiple of 8, so one file in 32 has a header
        # length whose low byte is 0x80, pickle's PROTO opcode. Such a file is safetensors when its header is JSON.
        if 2 <= header_len <= _SAFETENSORS_MAX_HEADER and (
            head[:1] != bytes([_PICKLE_PROTO]) or _has_json_header(path, header_len)
        ):
            return "safetensors"
    if head[:1] == bytes([_PICKLE_PROTO]):
        # Legacy torch.save starts with the pickled magic number: PROTO n, LONG1 of 10 bytes, the number, STOP.
        if head[2:4] == b"\x8a\x0a" and int.from_bytes(head[4:14], "little") == _LEGACY_MAGIC_NUMBER:
            return "torch"
        return "pickle"
    if is_mindspore_ckpt(path):  # reads the first record's header only; never raises
        return "mindspore"
    return "unknown"

