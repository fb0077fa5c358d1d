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

Detections come grouped by image (ascending), each image's by decreasing score, at most `detections_per_image` per
image. Resizing, the colour order, normalisation and padding stay in Python (`cascade_rcnn.deploy.backends.OnnxDetector` runs
the project's own `Transform`), so the graph's inputs are bit-identical to what the PyTorch model sees.

Why the graph is shaped as it is:

- The PyTorch model loops over images in Python for proposal NMS and detection NMS; a trace would unroll that loop
  into a fixed batch size. Here both NMS steps are one ONNX `NonMaxSuppression` over all images at once, with the
  images as its *classes*: every candidate gets the score -inf in every image but its own, so each image is
  suppressed alone and capped alone (`max_output_boxes_per_class` = 1000 proposals or 100 detections per image).
- Within an image, classes (or RPN levels) are kept apart by mmcv's offset trick with the image's own maximum
  coordinate, exactly as `postprocess.batched_nms` computes it below 10000 candidates, so the same boxes are
  compared in the same float32 arithmetic. (Above 10000 candidates the PyTorch path runs mmcv's per-class NMS, whose
  IoUs differ from the offset boxes' by float rounding: detections can differ where an IoU is within ~1e-4 of the
  threshold.) The seed's `class_nms="per_class"` (always one NMS per class) and detectron2's `"torchvision"` (one NMS
  per class above 1000 candidates) are exported the same way, with the same caveat.
- detectron2's `rescale="after_nms"` (NMS in the resized frame, then boxes mapped back, clipped to the original image
  and empty ones dropped) needs each image's original size: such graphs take a fourth input, `original_sizes`
  (B, 2) int64 (h, w) (`ImageBatch.original_sizes`), and may return fewer than `detections_per_image` per image.
- Top-k sizes are min(k, level size) computed in the graph, so feature maps smaller than k at other input sizes work.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cascade_rcnn.modeling.box_coder import clip_boxes
from cascade_rcnn.config import config_to_dict
from cascade_rcnn.errors import CascadeRCNNError

OPSET = 17  # RoiAlign's half-pixel mode (aligned=True) needs opset >= 16
INPUT_NAMES = ["images", "image_sizes", "scale_factors"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "batch_index"]


class ExportError(CascadeRCNNError):
    """The model uses a setting the ONNX graph does not reproduce."""


class ImageNMS(torch.autograd.Function):
    """NMS run separately per image over one flat candidate list, exported as one ONNX NonMaxSuppression.

    boxes (N, 4), scores (B, N) with -inf wherever a candidate is not the row's image's (or is invalid). Returns
    (M, 2) int64 rows [image, candidate index], grouped by image, each image's kept candidates by decreasing score
    (ties in index order), at most `max_per_image` each. Suppression when IoU > `iou_threshold` (torchvision's and
    ONNX Runtime's rule).
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float, max_per_image: int) -> Tensor:
        from torchvision.ops import nms

        selected = []
        for image, row in enumerate(scores):
            idx = torch.nonzero(row > float("-inf")).squeeze(1)
            keep = idx[nms(boxes[idx], row[idx], iou_threshold)][:max_per_image]
            selected.append(torch.stack([torch.full_like(keep, image), keep], dim=1))
        return torch.cat(selected) if selected else boxes.new_zeros((0, 2), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, max_per_image: int):
        selected = g.op(
            "NonMaxSuppression",
            g.op("Unsqueeze", boxes, g.op("Constant", value_t=torch.tensor([0]))),
            g.op("Unsqueeze", scores, g.op("Constant", value_t=torch.tensor([0]))),
            g.op("Constant", value_t=torch.tensor([max_per_image], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([float("-inf")], dtype=torch.float32)),
        )
        # Rows are [batch 0, class = image, box index].
        return g.op("Gather", selected, g.op("Constant", value_t=torch.tensor([1, 2])), axis_i=1)


def image_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, images: Tensor, valid: Tensor, num_images: Tensor | int,
    iou_threshold: float, max_per_image: int,
) -> tuple[Tensor, Tensor]:
    """Per-image, per-group NMS of a flat candidate list: (image, index) of the kept candidates.

    boxes (N, 4) >= 0, scores (N,), groups (N,) (classes or RPN levels), images (N,), valid (N,) bool. Groups are
    offset apart by `group * (max valid coordinate of the image + 1)`, as `postprocess.batched_nms` does per image.
    """
    image_ids = torch.arange(num_images, device=boxes.device)
    member = images[None, :] == image_ids[:, None]  # (B, N)
    coords = torch.where(valid, boxes.amax(dim=1), torch.zeros_like(scores))
    image_max = torch.where(member, coords[None, :], torch.zeros_like(coords)[None, :]).amax(dim=1)
    shifted = boxes + (groups.to(boxes.dtype) * (image_max[images] + 1))[:, None]
    per_image = torch.where(member & valid[None, :], scores[None, :], torch.full_like(scores, float("-inf"))[None, :])
    selected = ImageNMS.apply(shifted, per_image, iou_threshold, max_per_image)
    return selected[:, 0], selected[:, 1]


def _topk_size(x: Tensor, k: int) -> Tensor | int:
    """min(k, x.shape[1]), kept symbolic while tracing so that smaller feature maps work at other input sizes."""
    if not torch.jit.is_tracing():
        return min(k, x.shape[1])
    n = torch._shape_as_tensor(x)[1].unsqueeze(0)
    return torch.min(torch.cat([torch.tensor([k], dtype=n.dtype), n]))


class DetectorGraph(nn.Module):
    """`CascadeRCNN.predict_batch` in batch-vectorised, traceable form (the graph `export_onnx` writes).

    Shares the model's modules. forward(images, image_sizes, scale_factors) -> (boxes, scores, labels, batch_index),
    as described in the module docstring.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        check_exportable(model)
        self.backbone, self.fpn, self.rpn, self.roi_heads = model.backbone, model.fpn, model.rpn, model.roi_heads
        self.score_thresh = model.score_thresh
        self.nms_thresh = model.nms_thresh
        self.detections_per_image = model.detections_per_image
        self.rescale = getattr(model, "rescale", "before_nms")

    def forward(
        self, images: Tensor, image_sizes: Tensor, scale_factors: Tensor, original_sizes: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        features = self.fpn(self.backbone(images))
        sizes = image_sizes.to(torch.float32)
        rois = self.proposals(features, sizes)
        features = [f.contiguous() for f in features]
        scores, stage_boxes, _ = self.roi_heads.predict_rois(features, rois, sizes)
        return self.detections(stage_boxes[-1], scores, rois[:, 0].long(), scale_factors, original_sizes)

    def proposals(self, features: list[Tensor], sizes: Tensor) -> Tensor:
        """RPN proposals of every image as RoIs (R, 5) = [image, x1, y1, x2, y2], grouped by image (`RPN.propose`)."""
        rpn = self.rpn
        logits, deltas = rpn.head(features)
        anchors = rpn.anchor_generator([f.shape[-2:] for f in features], features[0].device)
        level_boxes, level_scores, level_ids = [], [], []
        for level, (lvl_logits, lvl_deltas, lvl_anchors) in enumerate(zip(logits, deltas, anchors)):
            scores = lvl_logits.sigmoid() if rpn.proposal_score == "sigmoid" else lvl_logits
            scores, idx = scores.topk(_topk_size(scores, rpn.pre_nms_top_n["test"]), dim=1, sorted=True)
            picked = lvl_deltas.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
            boxes = rpn.box_coder.decode(picked.reshape(-1, 4), lvl_anchors[idx.reshape(-1)])
            level_boxes.append(boxes.reshape(scores.shape[0], -1, 4))
            level_scores.append(scores)
            level_ids.append(torch.zeros_like(idx[0]) + level)
        boxes = clip_boxes(torch.cat(level_boxes, dim=1), sizes, rpn.box_coder.clip_offset)  # (B, N, 4)
        scores = torch.cat(level_scores, dim=1)  # (B, N)
        levels = torch.cat(level_ids)  # (N,)
        num_images, n = scores.shape[0], scores.shape[1]
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        images = torch.arange(num_images, device=boxes.device)[:, None].expand(num_images, n).reshape(-1)
        if rpn.min_size is None:
            valid = torch.ones_like(scores, dtype=torch.bool)
        else:
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = (wh[:, 0] > rpn.min_size) & (wh[:, 1] > rpn.min_size)
        groups = levels.repeat(num_images) if rpn.nms_per_level else torch.zeros_like(images)
        image, index = image_nms(
            boxes, scores, groups, images, valid, num_images, rpn.nms_thresh, rpn.post_nms_top_n["test"]
        )
        return torch.cat([image.to(boxes.dtype)[:, None], boxes[index]], dim=1)

    def detections(
        self, boxes: Tensor, scores: Tensor, roi_images: Tensor, scale_factors: Tensor,
        original_sizes: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """`CascadeRCNN.detect` for every image: boxes (R, 4) or (R, 4K) mapped to original pixels (by the float64
        reciprocals of the scale factors, as `Transform.to_original`), then `multiclass_nms`; with
        rescale="after_nms", NMS first, then the mapping, the clip to `original_sizes` and the drop of empty boxes."""
        r, num_classes = scores.shape[0], scores.shape[1]
        factors = (1.0 / scale_factors).to(boxes.dtype).repeat(1, 2)  # (B, 4): 1/sw, 1/sh, 1/sw, 1/sh
        after_nms = self.rescale == "after_nms"
        if not after_nms:
            boxes = boxes.reshape(r, -1, 4) * factors[roi_images][:, None, :]
        boxes = boxes.reshape(r, -1, 4).expand(r, num_classes, 4).reshape(-1, 4)  # index = roi * K + class
        labels = torch.arange(num_classes, device=boxes.device)[None, :].expand(r, num_classes).reshape(-1)
        images = roi_images[:, None].expand(r, num_classes).reshape(-1)
        scores = scores.reshape(-1)
        image, index = image_nms(
            boxes, scores, labels, images, scores > self.score_thresh, scale_factors.shape[0], self.nms_thresh,
            self.detections_per_image,
        )
        boxes, scores, labels = boxes[index], scores[index], labels[index]
        if after_nms:
            if original_sizes is None:
                raise ExportError("rescale='after_nms' needs the images' original sizes")
            boxes = clip_boxes(boxes * factors[image], original_sizes[image])
            nonempty = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).squeeze(1)
            boxes, scores, labels, image = boxes[nonempty], scores[nonempty], labels[nonempty], image[nonempty]
        return boxes, scores, labels, image


def check_exportable(model: nn.Module) -> None:
    """Raise ExportError naming each setting of `model` that `DetectorGraph` does not reproduce."""
    problems = []
    if getattr(model, "class_nms", "offset") not in ("offset", "per_class", "torchvision"):
        problems.append(f"postprocess.class_nms={model.class_nms!r} (not one of offset, per_class, torchvision)")
    if getattr(model, "rescale", "before_nms") not in ("before_nms", "after_nms"):
        problems.append(f"postprocess.rescale={model.rescale!r} (not before_nms or after_nms)")
    if problems:
        raise ExportError("cannot export this model to ONNX: " + "; ".join(problems))


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
    `class_names`), so `OnnxDetector` can rebuild the input transform from the file alone. `optimize` exports the
    batch-norm-folded copy (`cascade_rcnn.deploy.optimize.fold_batch_norm`), which ONNX Runtime runs faster.
    """
    from cascade_rcnn.deploy.optimize import optimize_for_inference

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
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                **{name: {0: "batch"} for name in names[1:]},
                **{name: {0: "detections"} for name in OUTPUT_NAMES},
            },
        )
    _write_metadata(path, config, preset)
    return path


def _write_metadata(path: Path, config: object | None, preset: str | None) -> None:
    import onnx

    proto = onnx.load(str(path))
    entries = {"cascade_rcnn_format": "1", "cascade_rcnn_preset": preset or ""}
    if config is not None:
        entries["cascade_rcnn_config"] = json.dumps(config_to_dict(config))
        entries["class_names"] = json.dumps(list(config.names))
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(proto, str(path))
