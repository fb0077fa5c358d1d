"""Region proposal network: a shared 3x3 conv head on every FPN level, sigmoid objectness, class-free box deltas.

Proposals (mmdetection `RPNHead.predict_by_feat`): per level and image, the top-k anchors by objectness, decoded and
clipped to the resized image, boxes without positive size dropped, NMS within each level (never across levels), then
the best `post_nms_top_n` of the image. Proposals never carry gradient: the cascade trains on them as fixed boxes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade_rcnn.modeling.anchors import AnchorGenerator, inside_anchor_flags, valid_anchor_flags
from cascade_rcnn.modeling.box_coder import BoxCoder, clip_boxes
from cascade_rcnn.modeling.matcher import Matcher, sample_indices, sampling_generator, training_gt
from cascade_rcnn.modeling.postprocess import nms_per_image


class RPNHead(nn.Module):
    def __init__(self, in_channels: int = 256, num_anchors: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness (B, H*W*A) and deltas (B, H*W*A, 4), flattened in anchor order."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x), inplace=True)  # in place: at stride 4 the map is 62 MB at 800 x 1333
            b = t.shape[0]
            logits.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.bbox_pred(t).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return logits, deltas


class RegionProposalNetwork(nn.Module):
    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        box_coder: BoxCoder,
        matcher: Matcher,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        nms_per_level: bool = True,
        min_size: float | None = 0.0,
        smooth_l1_beta: float = 1.0 / 9.0,
        loss_box_weight: float = 1.0,
        proposal_score: Callable[[Tensor], Tensor] | None = torch.sigmoid,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = box_coder
        self.matcher = matcher
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.nms_per_level = nms_per_level
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_box_weight = loss_box_weight
        # What proposals are ranked by: a function of the logits (sigmoid, mmdetection), or the logits (None).
        self.proposal_score = proposal_score

    def forward(
        self,
        features: list[Tensor],
        image_sizes: Tensor | list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Proposals of the batch as RoIs (R, 5) = [image, x1, y1, x2, y2] grouped by image, their scores (R,)
        (`proposal_score` of the logits, or the logits), and, when `targets` are given, the RPN losses.
        `image_sizes`: (h, w) of each image, (B, 2) or a list."""
        logits, deltas = self.head(features)
        feature_sizes = [f.shape[-2:] for f in features]
        anchors = self.anchor_generator(feature_sizes, features[0].device)
        if isinstance(image_sizes, Tensor):
            sizes = image_sizes.float()
        else:
            sizes = torch.tensor(image_sizes, dtype=torch.float32, device=features[0].device).reshape(-1, 2)
        # Losses are always computed with the training proposal counts (mmdetection's `rpn_proposal`), whether or not
        # the module is in training mode: `model(images, targets)` is the training computation.
        mode = "train" if targets is not None else "test"
        with torch.no_grad():
            rois, scores = self.propose(logits, deltas, anchors, sizes, mode)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            losses = self.loss(logits, deltas, anchors, feature_sizes, image_sizes, targets)
        return rois, scores, losses

    def propose(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_sizes: Tensor,
        mode: str = "test",
    ) -> tuple[Tensor, Tensor]:
        """Proposals of every image of a batch, as RoIs (R, 5) = [image, x1, y1, x2, y2] grouped by image, and their
        scores (R,). `logits` (B, N_l) and `deltas` (B, N_l, 4) per level, `anchors` (N_l, 4) per level,
        `image_sizes` (B, 2) float (h, w). Batch-vectorised and traceable: eager inference, training and the ONNX
        graph all run it."""
        pre_nms, post_nms = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        level_boxes, level_scores, level_ids = [], [], []
        for level, (lvl_logits, lvl_deltas, lvl_anchors) in enumerate(zip(logits, deltas, anchors)):
            scores = lvl_logits.detach()
            if self.proposal_score is not None:
                scores = self.proposal_score(scores)
            scores, idx = scores.topk(_topk_size(scores, pre_nms), dim=1, sorted=True)
            picked = lvl_deltas.detach().gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
            boxes = self.box_coder.decode(picked.reshape(-1, 4), lvl_anchors[idx.reshape(-1)])
            level_boxes.append(boxes.reshape(scores.shape[0], -1, 4))
            level_scores.append(scores)
            level_ids.append(torch.zeros_like(idx[0]) + level)
        boxes = clip_boxes(torch.cat(level_boxes, dim=1), image_sizes[:, None, :], self.box_coder.clip_offset)
        scores = torch.cat(level_scores, dim=1)  # (B, N)
        levels = torch.cat(level_ids)  # (N,)
        num_images, n = scores.shape[0], scores.shape[1]
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        images = torch.arange(num_images, device=boxes.device)[:, None].expand(num_images, n).reshape(-1)
        if self.min_size is None:
            valid = torch.ones_like(scores, dtype=torch.bool)
        else:
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = (wh[:, 0] > self.min_size) & (wh[:, 1] > self.min_size)
        groups = levels.repeat(num_images) if self.nms_per_level else torch.zeros_like(images)
        image, index = nms_per_image(
            boxes, scores, groups, images, valid, num_images, self.nms_thresh, post_nms, full_nms=True
        )
        return torch.cat([image.to(boxes.dtype)[:, None], boxes[index]], dim=1), scores[index]

    def loss(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        feature_sizes: list[tuple[int, int]],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Sigmoid BCE on the sampled anchors and smooth-L1 on the positives' deltas, both divided by the batch's
        number of sampled anchors, sum over images of max(#pos, 1) + max(#neg, 1) (mmdetection's avg_factor: the
        regression loss too is divided by positives *and* negatives)."""
        all_anchors = torch.cat(anchors)
        all_logits = torch.cat(logits, dim=1)
        all_deltas = torch.cat(deltas, dim=1)
        sampled_logits, sampled_labels, pos_deltas, pos_targets = [], [], [], []
        num_samples = 0
        samples = self.sample_anchors(all_anchors, feature_sizes, image_sizes, targets)
        for i, (pos, neg, matched_gt) in enumerate(samples):
            sampled_logits.append(all_logits[i, torch.cat([pos, neg])])
            sampled_labels.append(torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(all_logits.dtype))
            pos_deltas.append(all_deltas[i, pos])
            pos_targets.append(self.box_coder.encode(matched_gt, all_anchors[pos]))
            num_samples += max(pos.numel(), 1) + max(neg.numel(), 1)
        loss_cls = F.binary_cross_entropy_with_logits(
            torch.cat(sampled_logits), torch.cat(sampled_labels), reduction="sum"
        )
        loss_box = F.smooth_l1_loss(
            torch.cat(pos_deltas), torch.cat(pos_targets), beta=self.smooth_l1_beta, reduction="sum"
        )
        return {"loss_rpn_cls": loss_cls / num_samples, "loss_rpn_box": self.loss_box_weight * loss_box / num_samples}

    def sample_anchors(
        self,
        anchors: Tensor,
        feature_sizes: list[tuple[int, int]],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image: (positive anchor indices (P,), negative anchor indices (M,), the gt box of each positive (P, 4)),
        indices into `anchors` (N, 4), all levels concatenated (mmdetection `RPNHead.get_targets`).

        Only anchors that may train are matched: those over the image's own padded area (its size rounded up to a
        multiple of 32, not the batch's), and lying inside the image itself (allowed_border 0, strict at the right and
        bottom). The low-quality matches are chosen among these anchors only. RPN matching is class-free.
        """
        num_anchors = self.anchor_generator.num_anchors_per_location
        samples = []
        for target, size in zip(targets, image_sizes):
            padded = tuple(-(-s // 32) * 32 for s in size)
            valid = torch.cat(
                [
                    valid_anchor_flags(fs, padded, stride, num_anchors, anchors.device)
                    for fs, stride in zip(feature_sizes, self.anchor_generator.strides)
                ]
            )
            inside = torch.nonzero(valid & inside_anchor_flags(anchors, size)).squeeze(1)
            gt_boxes, _, crowd_boxes = training_gt(target, size)
            matches = self.matcher(gt_boxes, anchors[inside], crowd_boxes)
            pos, neg = sample_indices(
                matches, self.batch_size_per_image, self.positive_fraction, sampling_generator(target, 0)
            )
            samples.append((inside[pos], inside[neg], gt_boxes[matches[pos]]))
        return samples


def _topk_size(x: Tensor, k: int) -> Tensor | int:
    """min(k, x.shape[1]), kept symbolic while tracing so that smaller feature maps work at other input sizes."""
    if not torch.jit.is_tracing():
        return min(k, x.shape[1])
    n = torch._shape_as_tensor(x)[1].unsqueeze(0)
    return torch.min(torch.cat([torch.tensor([k], dtype=n.dtype), n]))
