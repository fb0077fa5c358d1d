"""ONNX export of the whole detector, resize aside: backbone, FPN, RPN proposals, the three cascade stages and the
per-class NMS, with dynamic batch, height and width, for class-agnostic and class-specific heads.

The exported graph (opset 17, traced with the TorchScript exporter):

    inputs  images         (B, 3, H, W) float32  the normalised, padded batch `Transform` builds (`ImageBatch.tensor`)
            image_sizes    (B, 2) int64          each image's extent (h, w) in it (`ImageBatch.image_sizes`)
            scale_factors  (B, 2) float64        each image's resize factors (w_scale, h_scale)
                                                 (`ImageBatch.scale_factors`)
    outputs boxes          (D, 4) float32        xyxy in original-image pixels
            scores         (D,) float32
            labels         (D,) int64            0..num_classes-1
            batch_index    (D,) int64            the image of each detection
            mask_probs     (D, 2S, 2S) float32   mask models only (28 x 28 for every preset): each detection's mask
                                                 probabilities over its box, its label's channel (mean of the heads)

Detections come grouped by image (ascending), each image's by decreasing score, at most `detections_per_image` per
image. Resizing, the colour order, normalisation and padding stay in Python (`cascade_rcnn.deploy.backends.OnnxDetector`
runs the project's own `Transform`), so the graph's inputs are bit-identical to what the PyTorch model sees.

The graph is `CascadeRCNN.detect` traced, the function eager inference runs: proposal selection
(`RegionProposalNetwork.propose`), the cascade (`CascadeROIHeads.predict_rois`) and the post-processing
(`PostProcessor`) are batch-vectorised, so the trace does not unroll a loop over images. While tracing, both NMS
steps become one ONNX `NonMaxSuppression` over all images at once (`postprocess.ImageNMS`), classes and RPN levels kept
apart by mmcv's offset trick: every preset exports, and the seed's `class_nms="per_class"` and detectron2's
`"torchvision"` NMS can differ from the eager loop only where an IoU is within ~1e-4 of the threshold. detectron2's
`rescale="after_nms"` needs each image's original size: such graphs take a fourth input, `original_sizes` (B, 2)
int64 (h, w) (`ImageBatch.original_sizes`), and may return fewer than `detections_per_image` per image.

Masks are pasted outside the graph: `OnnxModel` (`cascade_rcnn.deploy.backends`) pastes `mask_probs` with the
detections' `boxes` by `cascade_rcnn.modeling.masks.paste_masks`, exactly as `CascadeRCNN.predict_batch` does, so its
`Detections.masks` equal the PyTorch ones up to the probabilities' float rounding. A user of the raw .onnx file pastes
by the same rule, one detection at a time into the original image of `batch_index`: the 2S x 2S cells are stretched over
the float box (cell centres at x1 + (j + 0.5) (x2 - x1) / 2S), sampled bilinearly at the pixel centres (x+0.5, y+0.5)
with zero beyond the outer cells (`grid_sample`, `align_corners=False`, zero padding), and a pixel is in the mask when
the value is >= the threshold stored in the file's metadata (`mask_threshold`, 0.5 for every preset); only the pixels x
in [floor(x1) - 1, ceil(x2) + 1), y likewise, are sampled, the rest are not in the mask. (The graph returns the small
maps, not 100 image-size masks: pasting box by box into one boolean mask per detection is the cheap way.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cascade_rcnn.config import config_to_dict
from cascade_rcnn.deploy.lean import MASK_OUTPUT
from cascade_rcnn.errors import CascadeRCNNError

OPSET = 17  # RoiAlign's half-pixel mode (aligned=True) needs opset >= 16
INPUT_NAMES = ["images", "image_sizes", "scale_factors"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "batch_index"]


class ExportError(CascadeRCNNError):
    """The model cannot be written as an ONNX graph."""


class DetectorGraph(nn.Module):
    """The module `export_onnx` traces: `model.detect` with the graph's inputs and outputs (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rescale = model.postprocessor.rescale

    def forward(
        self, images: Tensor, image_sizes: Tensor, scale_factors: Tensor, original_sizes: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        if original_sizes is None:
            if self.rescale == "after_nms":
                raise ExportError("rescale='after_nms' needs the images' original sizes")
            # Used only to clip after NMS: graphs that rescale before NMS do not take this input.
            original_sizes = image_sizes
        return self.model.detect(images, image_sizes, scale_factors, original_sizes)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    config: object | None = None,
    preset: str | None = None,
    example_size: tuple[int, int] = (320, 448),
    optimize: bool = True,
) -> Path:
    """Write `model` (a `CascadeRCNN`) as an ONNX graph with the contract of the module docstring.

    `config` and `preset` are stored in the file's metadata (`cascade_rcnn_config`, `cascade_rcnn_preset`,
    `class_names`), so `OnnxDetector` can rebuild the input transform from the file alone; a mask model's graph has
    the fifth output `mask_probs` and its pasting threshold in `mask_threshold`. `optimize` exports the
    batch-norm-folded copy (`cascade_rcnn.deploy.optimize.fold_batch_norm`), which ONNX Runtime runs faster.
    """
    from cascade_rcnn.deploy.extras import require
    from cascade_rcnn.deploy.optimize import optimize_for_inference

    require("onnx", extra="onnx", what="ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (The copy's channels-last conversion is a no-op in an ONNX graph, which has no memory formats.)
    graph = DetectorGraph(optimize_for_inference(model) if optimize else model).eval()
    gen = torch.Generator().manual_seed(0)
    h, w = example_size
    # Two images of different extents in one padded batch, so nothing batch- or size-specific is traced as constant.
    images = torch.randn((2, 3, h, w), generator=gen)
    image_sizes = torch.tensor([[h, w], [h - 32, w - 64]], dtype=torch.int64)
    scale_factors = torch.tensor([[1.5, 1.5], [1.25, 1.3]], dtype=torch.float64)
    inputs, names = (images, image_sizes, scale_factors), list(INPUT_NAMES)
    if graph.rescale == "after_nms":
        original_sizes = (image_sizes / scale_factors.flip(1)).round().long()  # (h, w) / (h_scale, w_scale)
        inputs, names = (*inputs, original_sizes), [*names, "original_sizes"]
    has_masks = getattr(model, "mask_heads", None) is not None
    outputs = [*OUTPUT_NAMES, MASK_OUTPUT] if has_masks else list(OUTPUT_NAMES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # Advanced indexing is exported as Gather ops; the indices here are never negative.
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        torch.onnx.export(
            graph,
            inputs,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=outputs,
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                **{name: {0: "batch"} for name in names[1:]},
                **{name: {0: "detections"} for name in outputs},
            },
        )
    _write_metadata(path, config, preset, model.mask_threshold if has_masks else None)
    return path


def _write_metadata(path: Path, config: object | None, preset: str | None, mask_threshold: float | None) -> None:
    """The file's metadata: the config (the backend rebuilds the input transform from it), the preset, the class
    names and, for mask models, `mask_threshold`: the exported model's own pasting threshold."""
    import onnx

    proto = onnx.load(str(path))
    entries = {"cascade_rcnn_format": "1", "cascade_rcnn_preset": preset or ""}
    if config is not None:
        entries["cascade_rcnn_config"] = json.dumps(config_to_dict(config))
        entries["class_names"] = json.dumps(list(config.names))
    if mask_threshold is not None:
        entries["mask_threshold"] = repr(float(mask_threshold))
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(proto, str(path))
