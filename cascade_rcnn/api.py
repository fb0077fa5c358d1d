"""The Python API: `Detector`.

    det = Detector.from_weights("model.safetensors")       # any weights file the project reads, or a known name
    det = Detector(preset="cascade_rcnn_r50_fpn", num_classes=3)   # untrained
    result = det.predict("image.jpg")                       # Detections, boxes in original pixels
    results = det.predict([img_a, img_b], batch_size=2)     # list of Detections
    result = det.predict(big_image, tile=512)               # sliced inference (`TileConfig` for the options)
    result = det.predict("image.jpg", tta=True)             # flip TTA (`TTAConfig(scales=(0.8, 1.0, 1.2))`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cascade_rcnn.config import ModelConfig, get_preset
from cascade_rcnn.data.image_io import as_rgb_array
from cascade_rcnn.errors import CascadeRCNNError, CheckpointError
from cascade_rcnn.inference import TileConfig, TTAConfig, load_pixels, predict_augmented
from cascade_rcnn.io.weights import (
    LoadReport,
    build_loaded_model,
    load_checkpoint,
    save_weights,
)
from cascade_rcnn.modeling.detector import CascadeRCNN, build_model
from cascade_rcnn.structures import Detections

ImageInput = Union[str, Path, Image.Image, np.ndarray, Tensor]

__all__ = ["Detector", "Detections", "TTAConfig", "TileConfig", "to_tensor_image"]


class Detector:
    """A Cascade R-CNN detector with its class names, ready for inference."""

    def __init__(
        self,
        preset: str = "cascade_rcnn_r50_fpn",
        *,
        config: ModelConfig | None = None,
        device: str | torch.device = "cpu",
        optimize: bool = True,
        bf16: bool = False,
        model: CascadeRCNN | None = None,
        **overrides: Any,
    ) -> None:
        """`optimize` runs inference on an optimised copy of the model (batch norm folded, channels-last; outputs equal
        up to float rounding; see `cascade_rcnn.deploy.optimize`); `bf16` runs its convolutions and linear layers in bfloat16.
        `model` wraps an already built model of this config instead of building an untrained one."""
        self.config = config if config is not None else get_preset(preset, **overrides)
        self.preset = preset
        self.device = torch.device(device)
        self.model: CascadeRCNN = (model if model is not None else build_model(self.config)).to(self.device).eval()
        self.load_report: LoadReport | None = None
        self.optimize = optimize
        self.bf16 = bf16
        self._inference: tuple[tuple, CascadeRCNN] | None = None

    @property
    def inference_model(self) -> CascadeRCNN:
        """The model `predict` runs: `self.model`, or its optimised copy, rebuilt when `self.model`'s weights change."""
        if not (self.optimize or self.bf16):
            return self.model
        from cascade_rcnn.deploy.optimize import (
            optimize_for_inference,
            parameter_versions,
        )

        key = (self.bf16, parameter_versions(self.model))
        if self._inference is None or self._inference[0] != key:
            self._inference = None  # drop the old copy before building the new one
            self._inference = (key, optimize_for_inference(self.model, bf16=self.bf16))
        return self._inference[1]

    @classmethod
    def from_weights(
        cls,
        weights: str | Path,
        *,
        device: str | torch.device = "cpu",
        preset: str | None = None,
        optimize: bool = True,
        bf16: bool = False,
    ) -> Detector:
        """Build the detector a weights file describes and load it (safetensors, mmdetection .pth, detectron2 .pkl,
        MindSpore .ckpt, or a known weights name such as `mindspore-coco`). `preset` overrides the file's own."""
        path = resolve_weights(weights)
        checkpoint = load_checkpoint(path, preset)
        try:
            model, report = build_loaded_model(checkpoint.config, checkpoint.state_dict, checkpoint.skipped)
        except CheckpointError as error:  # its messages name the tensor; say which file as well
            raise CheckpointError(f"{path}: {error}") from None
        detector = cls(
            checkpoint.preset or "cascade_rcnn_r50_fpn",
            config=checkpoint.config,
            device=device,
            optimize=optimize,
            bf16=bf16,
            model=model,
        )
        detector.load_report = report
        return detector

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.names

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file that `Detector.from_weights` can rebuild this detector from."""
        return save_weights(self.model, self.config, path, self.preset)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 1,
        score_thresh: float | None = None,
        return_stages: bool = False,
        tile: TileConfig | int | None = None,
        tta: TTAConfig | bool | None = None,
        progress: bool = False,
    ) -> Detections | list[Detections]:
        """Detect objects. Takes one image or a list: paths, PIL images, (H, W, 3) uint8 RGB arrays or (3, H, W)
        RGB tensors in 0-255. A single image gives one `Detections`, a list gives a list. Boxes are in the pixels of
        the image as given (EXIF orientation applied for files). `score_thresh` filters above the model's own.

        `tile` (a `TileConfig`, or a slice size in pixels) runs sliced inference for large images; `tta` (a
        `TTAConfig`, or True for a horizontal flip) runs test-time augmentation; both are box-only and go image by
        image (`cascade_rcnn.inference`); `progress` shows a bar over each image's slices."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if tile is not None or tta not in (None, False):
            return self._predict_augmented(items, single, batch_size, score_thresh, return_stages, tile, tta, progress)
        results: list[Detections] = []
        for start in range(0, len(items), max(batch_size, 1)):
            tensors = [to_tensor_image(x).to(self.device) for x in items[start : start + batch_size]]
            outputs: list[Detections | None] = [None] * len(tensors)
            # Images run together only when their padded input sizes are equal: padding a smaller image to a larger
            # canvas changes the features near its border, and batched results must equal one-by-one results.
            for group in self._group_by_padded_size(tensors):
                with torch.inference_mode():
                    dets = self.inference_model.predict([tensors[i] for i in group], return_stages=return_stages)
                for i, det in zip(group, dets):
                    outputs[i] = det
            for det in outputs:
                det = det.to("cpu").with_class_names(self.class_names)
                if score_thresh is not None:
                    det = det.filter(score_thresh)
                    if det.stages is not None:
                        det.stages = [s.filter(score_thresh) for s in det.stages]
                results.append(det)
        return results[0] if single else results

    def _predict_augmented(self, items: list, single: bool, batch_size: int, score_thresh: float | None,
                           return_stages: bool, tile: TileConfig | int | None, tta: TTAConfig | bool | None,
                           progress: bool) -> Detections | list[Detections]:  # fmt: skip
        if return_stages:
            raise CascadeRCNNError("return_stages is not available with tile or tta (their merge mixes the stages)")
        tile = TileConfig(size=tile) if isinstance(tile, int) and not isinstance(tile, bool) else tile
        tta = TTAConfig() if tta is True else (tta or None)
        results = []
        for item in items:
            det = predict_augmented(self.inference_model, load_pixels(item), tile=tile, tta=tta, batch_size=batch_size,
                                    device=self.device, progress=progress)  # fmt: skip
            det = det.with_class_names(self.class_names)
            results.append(det if score_thresh is None else det.filter(score_thresh))
        return results[0] if single else results

    def _group_by_padded_size(self, tensors: list[Tensor]) -> list[list[int]]:
        transform = self.model.transform
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(transform.padded_size(*t.shape[-2:]), []).append(i)
        return list(groups.values())


def to_tensor_image(image: ImageInput) -> Tensor:
    """Any supported image input -> (3, H, W) float32 RGB tensor in 0-255. Inputs are never modified."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise CascadeRCNNError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        return image.float()  # .float() copies integer tensors; float32 inputs are read, never written
    return torch.from_numpy(np.ascontiguousarray(as_rgb_array(image), dtype=np.float32)).permute(2, 0, 1)


def resolve_weights(weights: str | Path) -> Path:
    """A local path as is; otherwise a known weights name, fetched (and verified) into the cache."""
    path = Path(weights)
    try:
        if path.exists():
            return path
    except OSError as error:  # a name the file system refuses (too long): pathlib raises instead of saying False
        raise CheckpointError(f"{str(weights)[:80]}...: {error.strerror}") from None
    try:
        from cascade_rcnn.io.download import KNOWN_WEIGHTS, fetch_weights
    except ImportError:
        KNOWN_WEIGHTS = {}
    if str(weights) in KNOWN_WEIGHTS:
        return fetch_weights(str(weights))
    known = ", ".join(sorted(KNOWN_WEIGHTS)) or "none"
    raise CascadeRCNNError(f"{weights}: no such weights file, and not a known weights name (known: {known})")
