"""What a deployment path needs from the machine: optional packages (the extras) and CPU instruction sets.

    onnx = require("onnx", extra="onnx", what="export --format onnx")  # the module, or a one-line MissingExtraError
    cpu_isa()                                                             # e.g. ["avx2", "avx512f", "avx512_vnni"]
    warn_if_bf16_emulated()                                               # once per process, where bf16 is emulated
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

from cascade_rcnn.errors import CascadeRCNNError

# The instruction sets that decide which path is fast: fp32 (avx2, avx512f), int8 (the VNNI dot products, AMX tiles)
# and bf16 (avx512_bf16, AMX); flag names as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class MissingExtraError(CascadeRCNNError):
    """A path needs an optional package that is not installed: the message names the extra that brings it."""


def require(module: str, *, extra: str, what: str) -> ModuleType:
    """`module` imported, or a `MissingExtraError` saying in one line which extra `what` (a path, a flag) needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs {module}: pip install 'cascade-rcnn[{extra}]'") from None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's flags from /proc/cpuinfo (empty where there is none: not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa(flags: frozenset[str] | None = None) -> list[str]:
    """The instruction sets of `ISA_FLAGS` this CPU has (`flags`: this machine's by default), in that order."""
    flags = cpu_flags() if flags is None else flags
    return [name for name in ISA_FLAGS if name in flags]


def has_native_bf16(flags: frozenset[str] | None = None) -> bool | None:
    """Whether the CPU computes bf16 in hardware; None where its flags cannot be read (then nothing is claimed)."""
    flags = cpu_flags() if flags is None else flags
    return any(name in flags for name in NATIVE_BF16_FLAGS) if flags else None


@functools.cache
def warn_if_bf16_emulated() -> None:
    """One warning per process, on one line, where bf16 would be emulated (no avx512_bf16, no AMX): there oneDNN
    converts every bf16 operand to float32 and back, and the fp32 path is the faster one (measured 4.7x on AVX2)."""
    if has_native_bf16() is False:
        warnings.warn(
            "bf16 is emulated on this CPU (no avx512_bf16 or amx_bf16) and slower than float32 here: "
            "leave --bf16 off, or use int8 (cascade-rcnn quantize) for speed",
            RuntimeWarning,
            stacklevel=3,
        )
