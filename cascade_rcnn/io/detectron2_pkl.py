"""Read detectron2 model-zoo `.pkl` weights without running code from the file.

A model-zoo file (`model_final_*.pkl`) is one pickled dict:

    {'model': {name: numpy.ndarray, ...},     # detectron2 parameter names, state_dict order
     '__author__': 'Detectron2 Model Zoo',
     'matching_heuristics': True}              # optional (files made by tools/convert-torchvision-to-d2.py)

detectron2 reads it with `pickle.load(f, encoding='latin1')`: the Caffe2-era files were pickled by Python 2, whose byte
strings Python 3 must decode, and latin1 maps every byte to one character so numpy can restore the raw array bytes.

`pickle.load` on a downloaded file runs whatever the file asks for. This reader admits only the globals that numpy
array reconstruction and plain containers need; any other global (`os.system`, `builtins.eval`, a class) stops the read
with a `CheckpointError` naming the file and the global, before anything is called.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cascade_rcnn.errors import CheckpointError

# numpy's own array and scalar rebuild functions, taken from what numpy itself pickles so that no deprecated module
# path (`numpy.core` in numpy 2) has to be imported.
_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
_scalar = np.float32(0).__reduce__()[0]


def _checked_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct`, limited to plain ndarrays (subclasses such as np.matrix would run their own code)."""
    if subtype is not np.ndarray:
        raise CheckpointError(f"array of type {subtype!r:.80} refused (only numpy.ndarray is read)")
    return _reconstruct(subtype, shape, dtype)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles written by Python 3 use for `bytes` (the raw array data)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode refused for a {type(text).__name__} with codec {encoding!r}")
    return text.encode(encoding)


# Everything a model-zoo pickle may name, for numpy 1.x (`numpy.core`), numpy 2.x (`numpy._core`), Python 3
# (`builtins`) and Python 2 (`__builtin__`) writers. No entry can reach the file system, the interpreter or an import.
_ADMITTED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    **{(builtins, name): container for builtins in ("builtins", "__builtin__")
       for name, container in (("dict", dict), ("list", list), ("tuple", tuple))},
}


def _load_build(unpickler: pickle._Unpickler) -> None:
    """The BUILD opcode (set an object's state), allowed only on what numpy restores that way: arrays and dtypes."""
    state = unpickler.stack.pop()
    target = unpickler.stack[-1]
    if not isinstance(target, (np.ndarray, np.dtype)):
        raise CheckpointError(f"refused to set the state of a {type(target).__name__}")
    target.__setstate__(state)


class _ArrayUnpickler(pickle._Unpickler):
    """Unpickler that admits only numpy arrays, dtypes, scalars and plain containers.

    It extends the pure-Python unpickler so that BUILD can be restricted too; the array bytes are single opcodes, so
    the speed difference to the C unpickler is small.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise CheckpointError(f"refused global '{module}.{name}'") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refused persistent id (a torch.save file, not a detectron2 .pkl?)")


def read_detectron2_pkl(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read the arrays and the extra fields of a detectron2 model-zoo `.pkl`.

    Args:
        path: a pickle holding `{'model': {name: ndarray}, '__author__': ..., ...}`, from Python 2 or 3, any protocol.

    Returns:
        `(model, info)`: `model` maps parameter names to numpy arrays (file order, numpy scalars as 0-d arrays);
        `info` holds the other top-level entries, e.g. `{'__author__': 'Detectron2 Model Zoo',
        'matching_heuristics': True}`.

    Raises:
        CheckpointError: naming the file, when it is missing or not a pickle, when it names any global beyond numpy
            array reconstruction and plain containers (the message gives `module.name`), or when it lacks a `model`
            dict of arrays.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # latin1: see the module docstring (Python 2 byte strings, as detectron2 itself loads them).
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            pickle.UnpicklingError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a detectron2 model-zoo file (expected a dict with 'model'; found {found})")
    model: dict[str, np.ndarray] = {}
    for name, value in obj["model"].items():
        # fvcore's loader refuses anything but arrays too; a numpy scalar is read as the 0-d array it stands for.
        if not isinstance(value, (np.ndarray, np.generic)) or np.asarray(value).dtype == object:
            raise CheckpointError(f"{path}: model entry {name!r} is a {type(value).__name__}, not a numeric array")
        model[str(name)] = np.asarray(value)
    info = {k: v for k, v in obj.items() if k != "model"}
    return model, info
