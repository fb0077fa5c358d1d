"""Region proposal network: a shared 3x3 conv head on every FPN level, sigmoid objectness, class-free box deltas.

Proposals (mmdetection `RPNHead.predict_by_feat`): per level and image, the top-k anchors by objectness, decoded and
clipped to the resized image, boxes without positive size dropped, NMS within each level (never across levels), then
the best `post_nms_top_n` of the image. Proposals never carry gradient: the cascade trains on them as fixed boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade_rcnn.modeling.anchors import AnchorGenerator, inside_anchor_flags, valid_anchor_flags
from cascade_rcnn.modeling.box_coder import BoxCoder, clip_boxes
from cascade_rcnn.modeling.matcher import Matcher, sample_indices, sampling_generator, training_gt
from cascade_rcnn.modeling.postprocess import batched_nms


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
        proposal_score: str = "sigmoid",
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
        self.proposal_score = proposal_score

    def forward(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Proposals per image ((K, 4) boxes, (K,) scores: sigmoid, or logits with proposal_score="logit") and, when
        `targets` are given, the RPN losses."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator([f.shape[-2:] for f in features], features[0].device)
        mode = "train" if self.training else "test"
        with torch.no_grad():
            boxes, scores = self.propose(logits, deltas, anchors, image_sizes, mode)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            losses = self.loss(logits, deltas, anchors, [f.shape[-2:] for f in features], image_sizes, targets)
        return boxes, scores, losses

    def propose(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
        mode: str = "test",
    ) -> tuple[list[Tensor], list[Tensor]]:
        pre_nms, post_nms = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        level_boxes, level_scores, level_ids = [], [], []
        for level, (lvl_logits, lvl_deltas, lvl_anchors) in enumerate(zip(logits, deltas, anchors)):
            # Ranking by logits (detectron2) keeps apart what float32 sigmoids round to the same value near 1.
            scores = lvl_logits.detach()
            scores = scores.sigmoid() if self.proposal_score == "sigmoid" else scores
            k = min(pre_nms, scores.shape[1])
            scores, idx = scores.topk(k, dim=1, sorted=True)
            b = scores.shape[0]
            picked = lvl_deltas.detach().gather(1, idx[..., None].expand(b, k, 4))
            level_boxes.append(self.box_coder.decode(picked.reshape(-1, 4), lvl_anchors[idx.reshape(-1)]).view(b, k, 4))
            level_scores.append(scores)
            level_ids.append(torch.full((k,), level, dtype=torch.int64, device=scores.device))
        all_boxes = torch.cat(level_boxes, dim=1)
        all_scores = torch.cat(level_scores, dim=1)
        all_levels = torch.cat(level_ids)
        proposals, proposal_scores = [], []
        for boxes, scores, size in zip(all_boxes, all_scores, image_sizes):
            boxes = clip_boxes(boxes, size, self.box_coder.clip_offset)
            levels = all_levels
            if self.min_size is not None:
                wh = boxes[:, 2:] - boxes[:, :2]
                keep = torch.nonzero((wh[:, 0] > self.min_size) & (wh[:, 1] > self.min_size)).squeeze(1)
                boxes, scores, levels = boxes[keep], scores[keep], all_levels[keep]
            groups = levels if self.nms_per_level else torch.zeros_like(levels)
            keep = batched_nms(boxes, scores, groups, self.nms_thresh)[:post_nms]
            proposals.append(boxes[keep])
            proposal_scores.append(scores[keep])
        return proposals, proposal_scores

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
