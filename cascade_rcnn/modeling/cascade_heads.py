"""The cascade: three box heads trained at increasing IoU, each refining the previous stage's boxes.

Class axis convention (one place, pinned by a test): a stage's classification logits are (N, num_classes + 1) with
**background in the last column** (index num_classes), as mmdetection and detectron2 store their weights. Labels
0..num_classes-1 are the foreground classes; `num_classes` itself means background.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade_rcnn.modeling.box_coder import BoxCoder
from cascade_rcnn.modeling.matcher import Matcher, sample_indices, sampling_generator, training_gt, training_gt_rows
from cascade_rcnn.modeling.roi_align import MultiScaleRoIAlign


class StageSamples(NamedTuple):
    """One cascade stage's sampled training RoIs (see `CascadeROIHeads.sample_stage`)."""

    rois: Tensor
    labels: Tensor
    reg_targets: Tensor
    is_gt: Tensor
    gt_rows: Tensor


class BoxHead(nn.Module):
    """One stage: flatten (N, C, 7, 7) -> fc -> ReLU -> fc -> ReLU -> class logits (N, K + 1) and deltas.

    Deltas are (N, 4) when class-agnostic, else (N, 4 * num_reg_classes).
    """

    def __init__(self, in_features: int, fc_dim: int, num_classes: int, num_reg_classes: int) -> None:
        super().__init__()
        self.shared_fcs = nn.ModuleList([nn.Linear(in_features, fc_dim), nn.Linear(fc_dim, fc_dim)])
        self.fc_cls = nn.Linear(fc_dim, num_classes + 1)
        self.fc_reg = nn.Linear(fc_dim, 4 * num_reg_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)
        # Another kernel for the first fc, set by the inference copy only (`cascade_rcnn.deploy.optimize.PooledConv`):
        # the same product, taken on the (N, C, S, S) pooled maps themselves.
        self.pooled_fc: nn.Module | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, C, S, S) pooled features."""
        first, *rest = self.shared_fcs
        x = F.relu(first(x.flatten(1)) if self.pooled_fc is None else self.pooled_fc(x))
        for fc in rest:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class CascadeROIHeads(nn.Module):
    def __init__(
        self,
        roi_align: MultiScaleRoIAlign,
        box_heads: list[BoxHead],
        box_coders: list[BoxCoder],
        matchers: list[Matcher],
        num_classes: int,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        add_gt_as_proposals: bool = True,
        stage_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25),
        smooth_l1_beta: float = 1.0,
        score_ensemble: Callable[[list[Tensor]], Tensor] | None = None,
        refine_class: Callable[[Tensor, Tensor | None, int], Tensor] | None = None,
        refine_box_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.roi_align = roi_align
        self.box_heads = nn.ModuleList(box_heads)
        self.box_coders = box_coders
        self.matchers = matchers
        self.num_classes = num_classes
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.add_gt_as_proposals = add_gt_as_proposals
        self.stage_loss_weights = stage_loss_weights
        self.smooth_l1_beta = smooth_l1_beta
        # The peers' conventions, as functions chosen by `build_model`: how the stages' scores are combined at test
        # time, and which class's box a class-specific stage hands to the next stage.
        self.score_ensemble = score_ensemble or mean_logits
        self.refine_class = refine_class or refine_by_label
        self.refine_box_dtype = refine_box_dtype
        self.rois_per_chunk: int | None = None

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def run_stage(self, stage: int, features: list[Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (N, K + 1) and raw deltas of `stage` for `rois` (N, 5) = [batch_idx, x1, y1, x2, y2].

        With `rois_per_chunk` set (the inference copy sets it), RoIs are pooled and classified a chunk at a time: each
        RoI's result is its own, and the pooled features (50 MB for 1000 RoIs) need not all exist at once."""
        chunk = self.rois_per_chunk
        if chunk is None or rois.shape[0] <= chunk or torch.jit.is_tracing():
            return self.box_heads[stage](self.roi_align(features, rois))
        parts = [self.box_heads[stage](self.roi_align(features, part)) for part in rois.split(chunk)]
        return torch.cat([logits for logits, _ in parts]), torch.cat([deltas for _, deltas in parts])

    def decode_stage(self, stage: int, rois: Tensor, logits: Tensor, deltas: Tensor, image_sizes: Tensor,
                     labels: Tensor | None = None) -> Tensor:
        """Boxes (N, 4) that stage `stage` predicts for `rois`, clipped to each RoI's image (`image_sizes` (B, 2)).

        Class-specific heads use the deltas of the class `refine_class` picks (`refine_by_label`: `labels` (N,) in
        training, background rows -> best foreground class; `refine_by_argmax_with_background`: the seed's). The RoIs
        are first rounded to `refine_box_dtype` (the seed's float16 cast).
        """
        limits = image_sizes[rois[:, 0].long()]
        boxes_in = rois[:, 1:].to(self.refine_box_dtype).to(rois.dtype)
        boxes = self.box_coders[stage].decode(deltas, boxes_in, limits)
        if boxes.shape[1] == 4:
            return boxes
        labels = self.refine_class(logits, labels, self.num_classes)
        boxes = boxes.view(boxes.shape[0], -1, 4)
        labels = labels.clamp(max=boxes.shape[1] - 1)
        return boxes[torch.arange(boxes.shape[0], device=boxes.device), labels]

    def predict_rois(
        self, features: list[Tensor], rois: Tensor, image_sizes: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The cascade on the RoIs (N, 5) = [batch_idx, x1, y1, x2, y2] of a batch whose images span `image_sizes`
        (B, 2) float (h, w). Returns the ensemble's foreground scores (N, K) and, per stage, its decoded boxes (N, 4)
        or (N, 4K) and its own foreground scores (N, K). No per-image Python: the ONNX export traces it as is."""
        stage_logits, stage_boxes = [], []
        for stage in range(self.num_stages):
            logits, deltas = self.run_stage(stage, features, rois)
            boxes = self.box_coders[stage].decode(deltas, rois[:, 1:], image_sizes[rois[:, 0].long()])
            stage_logits.append(logits)
            stage_boxes.append(boxes if boxes.shape[1] == 4 else boxes[:, : 4 * self.num_classes])  # no background box
            if stage < self.num_stages - 1:
                rois = torch.cat([rois[:, :1], self.decode_stage(stage, rois, logits, deltas, image_sizes)], dim=1)
        scores = self.score_ensemble(stage_logits)[:, : self.num_classes]
        stage_scores = [F.softmax(logits, dim=1)[:, : self.num_classes] for logits in stage_logits]
        return scores, stage_boxes, stage_scores

    def loss(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """Per-stage classification and box losses, weighted by the stage loss weights.

        Each stage matches its input boxes at its own IoU and samples them; its predicted boxes, detached (so that a
        stage's regression is trained only by its own loss) and clipped, become the next stage's proposals, minus the
        ground-truth boxes that were added as proposals (mmdetection `refine_bboxes`).
        """
        return self.loss_and_positives(features, proposals, targets, image_sizes)[0]

    def loss_and_positives(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor, Tensor]]]:
        """`loss`, and each stage's positive samples: (rois (P, 5), labels (P,), rows (P,) of the targets they
        match), which the mask heads train on."""
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=features[0].device).reshape(-1, 2)
        losses: dict[str, Tensor] = {}
        positives = []
        proposals = [p.detach() for p in proposals]
        for stage in range(self.num_stages):
            rois, labels, reg_targets, is_gt, gt_rows = self.sample_stage(stage, proposals, targets, image_sizes)
            logits, deltas = self.run_stage(stage, features, rois)
            weight = self.stage_loss_weights[stage]
            loss_cls, loss_box = self.stage_losses(logits, deltas, labels, reg_targets)
            losses[f"loss_cls_stage{stage}"] = weight * loss_cls
            losses[f"loss_box_stage{stage}"] = weight * loss_box
            positive = labels < self.num_classes
            positives.append((rois[positive], labels[positive], gt_rows[positive]))
            if stage < self.num_stages - 1:
                proposals = self.refine_proposals(stage, rois, logits, deltas, labels, is_gt, sizes)
        return losses, positives

    def refine_proposals(
        self, stage: int, rois: Tensor, logits: Tensor, deltas: Tensor, labels: Tensor, is_gt: Tensor, sizes: Tensor
    ) -> list[Tensor]:
        """The next stage's proposals per image: this stage's boxes for its sampled `rois` (N, 5), clipped to each
        image (`sizes` (B, 2)), without the rows that were added ground truth (`is_gt` (N,)), in RoI order. Detached:
        the next stage's targets depend on these boxes, and no gradient may reach this stage's regression through
        them (mmdetection refines under no_grad)."""
        with torch.no_grad():
            refined = self.decode_stage(stage, rois, logits.detach(), deltas.detach(), sizes, labels)
            keep = ~is_gt
            batch_idx = rois[keep, 0].long()
            return [refined[keep][batch_idx == i] for i in range(sizes.shape[0])]

    def sample_stage(
        self,
        stage: int,
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
    ) -> StageSamples:
        """Match and sample one stage's training RoIs (mmdetection `MaxIoUAssigner` + `RandomSampler`).

        The proposals of image i are matched at this stage's IoU; then (with add_gt_as_proposals) its gt boxes are
        put in front of them as positives of their own gt. Per image, the sampled positives then the negatives, each
        in ascending index order into [gt; proposals] when all are taken; images in batch order. Crowd and empty gt
        boxes are left out, the others clipped to the image (h, w) of `image_sizes` (`training_gt`).

        Returns rois (S, 5), labels (S,) (num_classes = background), regression targets (S, 4) (zeros for
        negatives), is_gt (S,) bool (the RoI is a ground-truth box added as a proposal) and gt_rows (S,) int64 (the
        row of the image's target that a positive matches; -1 for negatives).
        """
        coder, matcher = self.box_coders[stage], self.matchers[stage]
        rois, labels, reg_targets, is_gt, gt_rows = [], [], [], [], []
        for i, (boxes, target, size) in enumerate(zip(proposals, targets, image_sizes)):
            gt_boxes, gt_labels, crowd_boxes = training_gt(target, size, warn=False)  # the RPN has warned
            rows = training_gt_rows(target, size)
            matches = matcher(gt_boxes, boxes, crowd_boxes)
            num_added = 0
            if self.add_gt_as_proposals:
                # Ground truth goes first, each gt a positive of itself (not of whichever equal box matches first).
                num_added = gt_boxes.shape[0]
                boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes])
                matches = torch.cat([torch.arange(num_added, device=matches.device), matches])
            pos, neg = sample_indices(
                matches, self.batch_size_per_image, self.positive_fraction, sampling_generator(target, stage + 1)
            )
            idx = torch.cat([pos, neg])
            sampled = boxes[idx]
            # Positives come first in `idx`: they take their gt's label and box; the rest are background.
            label = torch.full_like(idx, self.num_classes)
            label[: pos.numel()] = gt_labels[matches[pos]]
            target_deltas = torch.zeros_like(sampled)
            target_deltas[: pos.numel()] = coder.encode(gt_boxes[matches[pos]], boxes[pos])
            rois.append(torch.cat([sampled.new_full((len(idx), 1), i), sampled], dim=1))
            labels.append(label)
            reg_targets.append(target_deltas)
            is_gt.append(torch.cat([pos < num_added, torch.zeros_like(neg, dtype=torch.bool)]))
            gt_rows.append(torch.cat([rows[matches[pos]], torch.full_like(neg, -1)]))
        return StageSamples(
            torch.cat(rois), torch.cat(labels), torch.cat(reg_targets), torch.cat(is_gt), torch.cat(gt_rows)
        )

    def stage_losses(self, logits: Tensor, deltas: Tensor, labels: Tensor, reg_targets: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax cross-entropy over all samples; smooth-L1 on positives, averaged over all samples (mmdetection)."""
        num_samples = max(labels.numel(), 1)
        loss_cls = F.cross_entropy(logits, labels, reduction="sum") / num_samples
        positive = torch.nonzero(labels < self.num_classes).squeeze(1)
        pos_deltas = deltas[positive]
        if deltas.shape[1] > 4:  # class-specific: the deltas of the gt class
            pos_deltas = pos_deltas.view(len(positive), -1, 4)[torch.arange(len(positive)), labels[positive]]
        loss_box = F.smooth_l1_loss(pos_deltas, reg_targets[positive], beta=self.smooth_l1_beta, reduction="sum")
        return loss_cls, loss_box / num_samples


def proposals_to_rois(proposals: list[Tensor]) -> Tensor:
    """[(K_i, 4)] per image -> (sum K_i, 5) rows [batch_idx, x1, y1, x2, y2]."""
    return torch.cat([torch.cat([p.new_full((len(p), 1), i), p], dim=1) for i, p in enumerate(proposals)])


def rois_to_proposals(rois: Tensor, num_images: int) -> list[Tensor]:
    """RoIs (R, 5) = [image, x1, y1, x2, y2] grouped by image -> boxes (K_i, 4) per image (`proposals_to_rois`'s
    inverse)."""
    counts = torch.bincount(rois[:, 0].long(), minlength=num_images).tolist()
    return list(rois[:, 1:].split(counts))


def refine_by_label(logits: Tensor, labels: Tensor | None, num_classes: int) -> Tensor:
    """The class whose box a stage hands on (mmdetection, detectron2): the gt label in training, the best foreground
    class at test time and for background RoIs."""
    best_fg = logits[:, :num_classes].argmax(dim=1)
    return best_fg if labels is None else torch.where(labels == num_classes, best_fg, labels)


def refine_by_argmax_with_background(logits: Tensor, labels: Tensor | None, num_classes: int) -> Tensor:
    """The seed's: the argmax over all classes, background included (with a background regression slot, the
    background's own box)."""
    return logits.argmax(dim=1)


def mean_logits(stage_logits: list[Tensor]) -> Tensor:
    """softmax((l0 + l1 + l2) / 3), summed in stage order (mmdetection)."""
    total = stage_logits[0]
    for logits in stage_logits[1:]:
        total = total + logits
    return F.softmax(total / float(len(stage_logits)), dim=1)


def mean_probs(stage_logits: list[Tensor]) -> Tensor:
    """The mean of the stages' softmax, (p0 + p1 + p2) * (1 / 3) in that float order (detectron2, the paper)."""
    return sum(F.softmax(logits, dim=1) for logits in stage_logits) * (1.0 / len(stage_logits))


def last_stage(stage_logits: list[Tensor]) -> Tensor:
    """The last stage's softmax alone (the seed)."""
    return F.softmax(stage_logits[-1], dim=1)


# `cascade.score_ensemble` and `cascade.refine_class` values -> the functions `build_model` gives the heads.
SCORE_ENSEMBLES: dict[str, Callable[[list[Tensor]], Tensor]] = {
    "mean_logits": mean_logits,
    "mean_probs": mean_probs,
    "last": last_stage,
}
REFINE_RULES: dict[str, Callable[[Tensor, Tensor | None, int], Tensor]] = {
    "label": refine_by_label,
    "argmax_with_background": refine_by_argmax_with_background,
}


def combine_stage_scores(stage_logits: list[Tensor], mode: str) -> Tensor:
    """Class probabilities (N, K + 1) from the stages' logits by the ensemble named `mode` (`SCORE_ENSEMBLES`)."""
    try:
        ensemble = SCORE_ENSEMBLES[mode]
    except KeyError:
        raise ValueError(f"unknown score ensemble {mode!r}") from None
    return ensemble(stage_logits)
