"""Optional dependencies and CPU instruction sets (issue 18 item 1): a path whose package is missing says in one line
which extra to install; bf16 on a CPU without bf16 instructions warns once; `cpu_isa` reads the flags that matter."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from cascade_rcnn.cli import main
from cascade_rcnn.deploy import extras
from cascade_rcnn.deploy.extras import MissingExtraError, cpu_isa, has_native_bf16, require
from cascade_rcnn.errors import CascadeRCNNError


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `import module` fail as it does where the package is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "openvino")
    with pytest.raises(MissingExtraError, match=r"pip install 'cascade-rcnn\[openvino\]'"):
        require("openvino", extra="openvino", what="the openvino backend")
    assert issubclass(MissingExtraError, CascadeRCNNError)
    assert require("json", extra="none", what="x").dumps([]) == "[]"


def test_export_without_onnx_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    hide(monkeypatch, "onnx")
    err = one_line_error(capsys, ["export", "--weights", "w.safetensors", "--output", str(tmp_path / "m.onnx")])
    assert "pip install 'cascade-rcnn[onnx]'" in err


def test_export_openvino_without_openvino_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    hide(monkeypatch, "openvino")
    argv = ["export", "--format", "openvino", "--weights", "w.safetensors", "--output", str(tmp_path / "m.xml")]
    assert "pip install 'cascade-rcnn[openvino]'" in one_line_error(capsys, argv)
    # The suffix names the format.
    argv[-1] = str(tmp_path / "m.onnx")
    assert "expected a .xml file" in one_line_error(capsys, argv)


def test_backends_without_their_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cascade_rcnn.deploy.backends import load_backend

    hide(monkeypatch, "openvino", "onnxruntime")
    with pytest.raises(MissingExtraError, match=r"cascade-rcnn\[openvino\]"):
        load_backend(tmp_path / "model.xml", "openvino")
    with pytest.raises(MissingExtraError, match=r"cascade-rcnn\[onnx\]"):
        load_backend(tmp_path / "model.onnx", "onnxruntime")


def test_benchmark_without_onnxruntime_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    hide(monkeypatch, "onnxruntime")
    for name in ("a.jpg", "b.jpg"):  # never read: the check comes first
        (tmp_path / name).write_bytes(b"")
    err = one_line_error(capsys, ["benchmark", "--images", str(tmp_path)])
    assert "pip install 'cascade-rcnn[onnx]'" in err and "--no-onnx" in err


def test_cpu_isa_reads_the_flags_that_matter() -> None:
    epyc = frozenset(["fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"])
    assert cpu_isa(epyc) == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    sapphire = epyc | {"amx_bf16", "amx_int8", "amx_tile", "avx_vnni"}
    assert cpu_isa(sapphire) == ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    assert cpu_isa(frozenset({"sse2", "avx2"})) == ["avx2"]
    assert has_native_bf16(epyc) and has_native_bf16(sapphire) and not has_native_bf16(frozenset({"avx2"}))
    assert has_native_bf16(frozenset()) is None  # unknown: nothing claimed
    assert set(cpu_isa()) <= set(extras.ISA_FLAGS)


@pytest.mark.parametrize("flags", ["avx2 avx512f", "avx2 avx512f avx512_bf16"])
def test_bf16_warns_once_where_emulated(monkeypatch: pytest.MonkeyPatch, flags: str) -> None:
    from cascade_rcnn.api import Detector

    monkeypatch.setattr(extras, "cpu_flags", lambda: frozenset(flags.split()))
    extras.warn_if_bf16_emulated.cache_clear()
    det = Detector(bf16=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert det.inference_model is not det.model
        second = Detector(config=det.config, bf16=True)
        assert second.inference_model is not second.model  # a second bf16 copy: no second warning
    extras.warn_if_bf16_emulated.cache_clear()
    emulated = [w for w in caught if "bf16 is emulated" in str(w.message)]
    assert len(emulated) == (0 if "avx512_bf16" in flags else 1)
    if emulated:
        assert "\n" not in str(emulated[0].message)
def test_quantize_without_its_packages(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    hide(monkeypatch, "nncf")
    (tmp_path / "calib").mkdir()
    argv = ["quantize", "--weights", "w.safetensors", "--calib-images", str(tmp_path / "calib"),
            "--output", str(tmp_path / "int8.xml")]  # fmt: skip
    assert "pip install 'cascade-rcnn[int8]'" in one_line_error(capsys, argv)


