"""A SAHI `DetectionModel` for this project's `Detector`, so SAHI's own pipeline (`get_sliced_prediction`,
`get_prediction`, `predict`) runs our models. Needs the `sahi` extra: `pip install 'cascade-rcnn[sahi]'`.

    from sahi.predict import get_sliced_prediction
    from cascade_rcnn.integrations.sahi import CascadeRCNNDetectionModel

    model = CascadeRCNNDetectionModel(model_path="model.safetensors", confidence_threshold=0.3, device="cpu")
    result = get_sliced_prediction("big.png", model, slice_height=256, slice_width=256)

`model_path` is anything `Detector.from_weights` reads (a weights file or a known name); `model=` takes a built
`Detector`. Category ids are the model's 0-based labels, named by its class names (`category_mapping`). A batch of
slices runs as one `Detector.predict` call (SAHI's `batch_size`). A mask model's masks reach SAHI as polygons.
`image_size` is not used: the model resizes each slice by its own rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
except ImportError:  # one line naming the extra, not a traceback into SAHI's absence
    raise ImportError("cascade_rcnn.integrations.sahi needs SAHI: pip install 'cascade-rcnn[sahi]'") from None

from cascade_rcnn.api import Detector

__all__ = ["CascadeRCNNDetectionModel"]


class CascadeRCNNDetectionModel(DetectionModel):
    """SAHI `DetectionModel` over a `cascade_rcnn.api.Detector` (see the module docstring)."""

    model: Detector

    def load_model(self) -> None:
        if self.model_path is None:
            raise ValueError("CascadeRCNNDetectionModel needs model_path (a weights file or known name) or model=")
        self.set_model(Detector.from_weights(self.model_path, device=str(self.device)))

    def set_model(self, model: Any, **kwargs: Any) -> None:
        if not isinstance(model, Detector):
            raise TypeError(f"expected a cascade_rcnn.api.Detector, got {type(model).__name__}")
        self.model = model
        if self.category_mapping is None:
            self.category_mapping = {str(i): name for i, name in enumerate(model.class_names)}

    def perform_inference(self, image: np.ndarray) -> None:
        """Detect on one (H, W, 3) RGB image; the raw result is a one-element list of `Detections`."""
        self._original_predictions = [self.model.predict(np.ascontiguousarray(image))]

    def perform_batch_inference(self, images: list[np.ndarray]) -> None:
        """Detect on a batch of slices in one `Detector.predict` call."""
        self._original_predictions = self.model.predict([np.ascontiguousarray(i) for i in images],
                                                        batch_size=len(images))  # fmt: skip
        self._original_shapes = [image.shape for image in images]

    @property
    def num_categories(self) -> int:
        return len(self.model.class_names)

    @property
    def has_mask(self) -> bool:
        return bool(self.model.config.has_masks)

    @property
    def category_names(self) -> list[str]:
        return list(self.model.class_names)

    def _create_object_prediction_list_from_original_predictions(
        self,
        shift_amount_list: list[list[int | float]] | None = [[0, 0]],  # noqa: B006 - SAHI's signature
        full_shape_list: list[list[int | float]] | None = None,
    ) -> None:
        if shift_amount_list and isinstance(shift_amount_list[0], (int, float)):  # SAHI passes one image's unwrapped
            shift_amount_list = [shift_amount_list]  # type: ignore[list-item]
        if full_shape_list and isinstance(full_shape_list[0], (int, float)):
            full_shape_list = [full_shape_list]  # type: ignore[list-item]
        per_image = []
        for index, detections in enumerate(self._original_predictions):
            shift = shift_amount_list[index] if shift_amount_list else [0, 0]
            full_shape = full_shape_list[index] if full_shape_list else None
            keep = (detections.scores > self.confidence_threshold).nonzero().squeeze(1)
            masks = detections.masks.cpu().numpy() if detections.masks is not None else None  # rows masks[i] below
            predictions = []
            for i in keep.tolist():
                label = int(detections.labels[i])
                segmentation = None
                if masks is not None:
                    from sahi.utils.cv import get_coco_segmentation_from_bool_mask

                    segmentation = get_coco_segmentation_from_bool_mask(masks[i])
                    if not segmentation:  # a mask too small to give a polygon: keep the box alone
                        segmentation = None
                predictions.append(ObjectPrediction(
                    bbox=detections.boxes[i].tolist(),
                    category_id=label,
                    category_name=self.category_mapping.get(str(label), str(label)) if self.category_mapping else "",
                    segmentation=segmentation,
                    score=float(detections.scores[i]),
                    shift_amount=list(shift),
                    full_shape=None if full_shape is None else list(full_shape),
                ))  # fmt: skip
            per_image.append(predictions)
        self._object_prediction_list_per_image = per_image
