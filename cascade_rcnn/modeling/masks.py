"""Instance masks (Cascade Mask R-CNN): the FCN mask heads, their training targets and loss, and pasting.

At test time the mask heads run on the final detections (after NMS, in the resized frame): each head gives (D, K,
2S, 2S) logits, the detection's label channel is kept, and the heads' sigmoid probabilities are averaged (mmdetection
runs one head per stage, all on the same boxes, and averages probabilities, not logits; detectron2 has one head). The
(D, 2S, 2S) probabilities are the model's output (and the ONNX graph's); `paste_masks` puts them into the original
image, one box at a time.

In training, a head learns from the positive RoIs of its cascade stage: the target of a RoI is its ground-truth mask
(in the resized frame) pooled over the RoI by RoIAlign (aligned, adaptive sampling) at the logits' size and
thresholded at 0.5 (mmdetection's `BitmapMasks.crop_and_resize`); the loss is the binary cross-entropy of the label
channel's logits, averaged over RoIs and cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from cascade_rcnn.modeling.roi_align import MultiScaleRoIAlign
from cascade_rcnn.paste import paste_masks_array
from cascade_rcnn.structures import Detections


class MaskHead(nn.Module):
    """(N, C, S, S) RoI features -> `num_convs` x [3x3 conv + ReLU] -> 2x2 stride-2 transposed conv + ReLU -> 1x1 conv:
    (N, num_classes, 2S, 2S) logits, one channel per foreground class (no background), before sigmoid."""

    def __init__(self, *, in_channels: int, conv_dim: int, num_convs: int, num_classes: int) -> None:
        super().__init__()
        dims = [in_channels] + [conv_dim] * num_convs
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(dims[:-1], dims[1:]))
        self.upsample = nn.ConvTranspose2d(dims[-1], conv_dim, 2, stride=2)
        self.logits = nn.Conv2d(conv_dim, num_classes, 1)
        # mmdetection's FCNMaskHead initialisation: He (fan_out) for every layer, zero biases.
        for layer in [*self.convs, self.upsample, self.logits]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.logits(F.relu(self.upsample(x)))


class CascadeMaskHeads(nn.Module):
    """The mask heads of a Cascade Mask R-CNN: one per stage (`train_stages` = (0, 1, 2), mmdetection) or one trained
    on the first stage's positives (`train_stages` = (0,), detectron2); `loss_weights` scale each head's loss."""

    def __init__(
        self,
        *,
        roi_align: MultiScaleRoIAlign,
        heads: list[MaskHead],
        train_stages: tuple[int, ...],
        loss_weights: tuple[float, ...],
    ) -> None:
        super().__init__()
        if not len(heads) == len(train_stages) == len(loss_weights):
            raise ValueError("one train stage and one loss weight per mask head")
        self.roi_align = roi_align
        self.heads = nn.ModuleList(heads)
        self.train_stages = train_stages
        self.loss_weights = loss_weights

    def predict(self, features: list[Tensor], rois: Tensor, labels: Tensor) -> Tensor:
        """Mask probabilities (D, 2S, 2S) of the detections `rois` (D, 5) = [image, x1, y1, x2, y2] (resized frame)
        with `labels` (D,): the mean over the heads of the sigmoid of each head's label channel."""
        pooled = self.roi_align(features, rois)
        rows = torch.arange(rois.shape[0], device=rois.device)
        total = None
        for head in self.heads:
            probs = torch.sigmoid(head(pooled)[rows, labels])
            total = probs if total is None else total + probs
        if total is None or len(self.heads) == 1:
            return total
        return total / float(len(self.heads))

    def loss(
        self, features: list[Tensor], stage: int, positives: tuple[Tensor, Tensor, Tensor], gt_masks: list[Tensor]
    ) -> dict[str, Tensor]:
        """The mask loss of the head trained on cascade stage `stage` (empty when no head is): `positives` = (rois
        (P, 5) the stage's positive RoIs, labels (P,), gt_index (P,) each RoI's row in its image's targets), `gt_masks`
        per image (G_i, H, W) in the resized frame."""
        if stage not in self.train_stages:
            return {}
        k = self.train_stages.index(stage)
        rois, labels, gt_index = positives
        logits = self.heads[k](self.roi_align(features, rois))
        if rois.shape[0] == 0:
            loss = logits.sum() * 0.0  # keeps the graph (and DDP's used parameters) without a NaN mean
        else:
            targets = mask_targets(rois, gt_index, gt_masks, logits.shape[-1])
            selected = logits[torch.arange(rois.shape[0], device=rois.device), labels]
            loss = F.binary_cross_entropy_with_logits(selected, targets)
        return {f"loss_mask_stage{stage}": self.loss_weights[k] * loss}


def mask_targets(rois: Tensor, gt_index: Tensor, gt_masks: list[Tensor], size: int) -> Tensor:
    """(P, size, size) float 0/1 targets: each RoI's ground-truth mask pooled over the RoI (RoIAlign, aligned, adaptive
    sampling, 1 px per cell unit) and thresholded at >= 0.5. `rois` (P, 5) = [image, box], `gt_index` (P,) rows into
    `gt_masks[image]` ((G_i, H, W), any dtype, 0/1)."""
    targets = rois.new_zeros((rois.shape[0], size, size))
    images = rois[:, 0].long()
    for image in torch.unique(images).tolist():
        rows = torch.nonzero(images == image).squeeze(1)
        masks = gt_masks[image]
        used, inverse = torch.unique(gt_index[rows], return_inverse=True)
        # Only the masks these RoIs need, as float maps, each RoI pooling from its own mask (the batch index of
        # roi_align picks the mask).
        maps = masks[used].to(rois.dtype)[:, None]
        boxes = torch.cat([inverse[:, None].to(rois.dtype), rois[rows, 1:].detach()], dim=1)
        pooled = roi_align(maps, boxes, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        targets[rows] = (pooled[:, 0] >= 0.5).to(rois.dtype)
    return targets


def paste_masks(probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Binary masks (D, h, w) bool in an (h, w) image from mask probabilities (D, S, S) over `boxes` (D, 4) (that
    image's pixels), on the probabilities' device: `cascade_rcnn.paste.paste_masks_array` (the peers' CPU paste, box
    by box, bit-identical to torch's `grid_sample`), which the torch-free deployment runs too."""
    masks = paste_masks_array(probs.detach().float().cpu().numpy(), boxes.detach().float().cpu().numpy(),
                              image_size, threshold)
    return torch.from_numpy(masks).to(probs.device)


def paste_per_image(
    detections: list[Detections], probs: Tensor, original_sizes: list[tuple[int, int]], threshold: float = 0.5
) -> None:
    """Set each image's `masks`: the batch's mask probabilities (D, S, S), grouped by image in the order of
    `detections`, pasted over that image's boxes into its original (h, w) (`paste_masks`)."""
    parts = probs.split([len(d) for d in detections])
    for image_detections, image_probs, size in zip(detections, parts, original_sizes):
        image_detections.masks = paste_masks(image_probs, image_detections.boxes, size, threshold)
