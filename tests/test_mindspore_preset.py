"""The settings that make up `cascade_rcnn_r101_fpn_mindspore`, each checked on its own against the seed's documented
semantics (spec §5-6, `shared/reference/mindspore/README.md`), and the `.ckpt` name/layout map on small tensors.

Fast and self-contained: no shared data, no full-size model. Numerical parity with the real MindSpore run is in
`test_mindspore_parity.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_rcnn.modeling.anchors import base_anchors
from cascade_rcnn.modeling.box_coder import BoxCoder
from cascade_rcnn.modeling.cascade_heads import REFINE_RULES, BoxHead, CascadeROIHeads
from cascade_rcnn.config import get_preset
from cascade_rcnn.errors import CheckpointError, ConfigError
from cascade_rcnn.evaluation.coco import detections_to_coco
from cascade_rcnn.io.mindspore import PRESET, convert_mindspore_state_dict
from cascade_rcnn.io.mindspore_ckpt import write_mindspore_ckpt
from cascade_rcnn.modeling.matcher import Matcher
from cascade_rcnn.modeling.postprocess import multiclass_nms
from cascade_rcnn.modeling.roi_align import MultiScaleRoIAlign
from cascade_rcnn.modeling.detector import build_transform
from cascade_rcnn.modeling.transform import Transform
from cascade_rcnn.io.torch_checkpoint import sniff_checkpoint_format
from cascade_rcnn.io.weights import load_checkpoint

# ---------------------------------------------------------------------------------------------------------------------
# Input transform


def seed_transform() -> Transform:
    return build_transform(get_preset(PRESET))


# The reference images' (h, w), the size after the seed's rescale(s) and its scale (reference README table).
SEED_RESIZES = [
    ((426, 640), (768, 1154), 1.80282),
    ((640, 586), (768, 703), 1.19967),  # portrait: two rescales
    ((483, 640), (768, 1018), 1.59006),
    ((500, 375), (768, 576), 1.536),  # portrait
    ((640, 428), (768, 514), 1.20043),  # portrait
    ((640, 638), (768, 766), 1.20064),  # portrait (by 2 px)
]


@pytest.mark.parametrize(("size", "resized", "scale"), SEED_RESIZES)
def test_rescale_matches_the_seed(size: tuple[int, int], resized: tuple[int, int], scale: float) -> None:
    transform = seed_transform()
    steps, got = transform.resize_steps(*size)
    assert steps[-1] == resized
    assert len(steps) == (2 if size[0] > size[1] else 1)
    assert got == pytest.approx(scale, abs=5e-6)
    image = torch.full((3, *size), 100.0)
    assert tuple(transform.resize(image).shape[-2:]) == resized


def test_without_second_rescale_a_portrait_image_overflows_the_canvas() -> None:
    transform = seed_transform()
    transform.resize_rule = transform.resize_rule.first  # the keep-ratio rule alone
    assert transform.resized_size(640, 586) == (839, 768)
    with pytest.raises(ValueError, match="fixed canvas"):
        transform.batch([torch.zeros(3, 839, 768)], [(640, 586)])


def test_padding_before_normalisation_fills_the_canvas_with_minus_mean_over_std() -> None:
    transform = seed_transform()
    image = torch.full((3, 700, 1000), 255.0)
    batch = transform.batch([image], [(350, 500)], [2.0])
    mean, std = transform.pixel_mean.flatten(), transform.pixel_std.flatten()
    assert batch.tensor.shape == (1, 3, 768, 1280)
    torch.testing.assert_close(batch.tensor[0, :, 699, 999], (255 - mean) / std)
    torch.testing.assert_close(batch.tensor[0, :, 700, 0], -mean / std)  # below the image
    torch.testing.assert_close(batch.tensor[0, :, 0, 1000], -mean / std)  # right of the image
    assert batch.image_sizes == [(768, 1280)]  # clip_to="canvas"
    assert batch.scale_factors == [(2.0, 2.0)]  # box_scale="scalar"
    transform.canvas.pad_before_normalize, transform.canvas.clip_to_canvas = False, False
    batch = transform.batch([image], [(350, 500)], [2.0])
    assert batch.tensor[0, :, 700:, :].abs().max() == 0
    assert batch.image_sizes == [(700, 1000)]


def test_scalar_box_scale_maps_back_with_the_resize_scale_on_both_axes() -> None:
    transform = seed_transform()
    batch, _ = transform([torch.zeros(3, 426, 640)])
    scale = 768 / 426
    assert batch.scale_factors[0] == pytest.approx((scale, scale), rel=1e-12)
    box = torch.tensor([[scale * 10, scale * 20, scale * 30, scale * 40]])
    torch.testing.assert_close(transform.to_original(box, batch.scale_factors[0]), torch.tensor([[10.0, 20, 30, 40]]))


# ---------------------------------------------------------------------------------------------------------------------
# Anchors, box coder, RoIAlign


def test_legacy_anchors_match_the_spec_table() -> None:
    table = {  # stride: ratio 0.5, 1, 2 (spec §2.4)
        4: [(-21, -9, 24, 12), (-14, -14, 17, 17), (-9, -21, 12, 24)],
        8: [(-41, -19, 48, 26), (-28, -28, 35, 35), (-19, -41, 26, 48)],
        16: [(-83, -37, 98, 52), (-56, -56, 71, 71), (-37, -83, 52, 98)],
        32: [(-165, -75, 196, 106), (-112, -112, 143, 143), (-75, -165, 106, 196)],
        64: [(-330, -149, 393, 212), (-224, -224, 287, 287), (-149, -330, 212, 393)],
    }
    a = get_preset(PRESET).anchors
    for stride, expected in table.items():
        got = base_anchors(stride, a.scales, a.ratios, a.center_offset, a.legacy_v1)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_seed_decode_formula_and_clip_to_the_canvas_size() -> None:
    c = get_preset(PRESET).box_coder
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2), c.scale_clamp, c.plus_one, c.clip_offset)
    box = torch.tensor([[100.0, 50.0, 199.0, 149.0]])  # "+1" width 100
    deltas = torch.tensor([[1.0, -0.5, 2.0, 30.0]])  # dh is clamped to |ln 0.016|
    pw, px, py = 100.0, 149.5, 99.5
    gw, gh = pw * math.exp(0.4), pw * math.exp(math.log(1000 / 16))
    gx, gy = px + pw * 0.1, py - pw * 0.05
    expected = torch.tensor([[gx - gw / 2 + 0.5, gy - gh / 2 + 0.5, gx + gw / 2 - 0.5, gy + gh / 2 - 0.5]])
    torch.testing.assert_close(coder.decode(deltas, box), expected)
    clipped = coder.decode(deltas, box, (768, 1280))
    assert clipped[0, 1] == 0 and clipped[0, 3] == 768  # the seed clips to H, not H - 1
    assert BoxCoder(plus_one=True).decode(deltas, box, (768, 1280))[0, 3] == 767  # mmdetection v1's bound


def mindspore_roi_align(feature: np.ndarray, roi: np.ndarray, scale: float, out: int, sample: int) -> np.ndarray:
    """MindSpore's CPU ROIAlign with roi_end_mode=1 on one (C, H, W) map, from its documented semantics: the RoI spans
    [x1 * scale, (x2 + 1) * scale] with no minimum size; bilinear samples are 0 outside [-1, H] x [-1, W]."""
    _, h, w = feature.shape
    x1, y1, x2, y2 = (float(v) for v in roi)
    start_x, start_y = x1 * scale, y1 * scale
    bin_w, bin_h = ((x2 + 1) * scale - start_x) / out, ((y2 + 1) * scale - start_y) / out

    def sample_at(y: float, x: float) -> np.ndarray:
        if y < -1 or y > h or x < -1 or x > w:
            return np.zeros(feature.shape[0])
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = math.floor(y), math.floor(x)
        y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        if y0 >= h - 1:
            y0 = y1_ = h - 1
            y = float(y0)
        if x0 >= w - 1:
            x0 = x1_ = w - 1
            x = float(x0)
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x1_]
                + ly * (1 - lx) * feature[:, y1_, x0] + ly * lx * feature[:, y1_, x1_])  # fmt: skip

    result = np.zeros((feature.shape[0], out, out))
    for ph in range(out):
        for pw in range(out):
            points = [
                sample_at(start_y + ph * bin_h + (iy + 0.5) * bin_h / sample,
                          start_x + pw * bin_w + (ix + 0.5) * bin_w / sample)
                for iy in range(sample) for ix in range(sample)
            ]  # fmt: skip
            result[:, ph, pw] = np.mean(points, axis=0)
    return result


def test_plus_one_roi_align_matches_the_mindspore_kernel() -> None:
    feature = torch.randn(1, 2, 12, 16, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([
        [0, 5.3, 7.1, 30.8, 25.2],  # ordinary
        [0, 20.0, 20.0, 20.5, 21.0],  # under one cell: torchvision's aligned=False would stretch it to one cell
        [0, 50.0, 30.0, 70.0, 52.0],  # reaches past the right/bottom border
        [0, -6.0, -3.0, 9.0, 4.0],  # starts outside the top-left
    ])  # fmt: skip
    ra = get_preset(PRESET).roi_align
    seed = MultiScaleRoIAlign((4,), 7, ra.sampling_ratio, ra.aligned, ra.canonical_size, ra.level_eps, ra.plus_one)
    got = seed([feature], rois)
    expected = np.stack([mindspore_roi_align(feature[0].numpy(), r[1:].numpy(), 0.25, 7, 2) for r in rois])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    legacy = MultiScaleRoIAlign((4,), 7, 2, aligned=False)([feature], rois)  # no "+1", 1-cell minimum
    assert (legacy - got).abs().amax(dim=(1, 2, 3)).min() > 1e-2


def test_plus_one_level_mapping_uses_w_plus_one() -> None:
    ra = MultiScaleRoIAlign((4, 8, 16, 32), aligned=False, plus_one=True)
    # sqrt((w + 1)(h + 1)) = 112 is exactly P3's lower bound; without the +1 it stays on P2.
    rois = torch.tensor([[0, 0, 0, 111.0, 111.0], [0, 0, 0, 110.0, 110.0]])
    assert ra.assign_levels(rois).tolist() == [1, 0]
    assert MultiScaleRoIAlign((4, 8, 16, 32)).assign_levels(rois).tolist() == [0, 0]


def test_plus_one_with_aligned_is_rejected() -> None:
    with pytest.raises(ConfigError, match="aligned"):
        get_preset(PRESET, **{"roi_align.aligned": True})
    with pytest.raises(ConfigError, match="class_agnostic"):
        get_preset(PRESET, **{"cascade.class_agnostic": True})


# ---------------------------------------------------------------------------------------------------------------------
# Cascade refinement, NMS, COCO output


def seed_heads(num_classes: int = 3) -> CascadeROIHeads:
    cfg = get_preset(PRESET, num_classes=num_classes)
    c, b = cfg.cascade, cfg.box_coder
    return CascadeROIHeads(
        MultiScaleRoIAlign((4,)),
        [BoxHead(8, 4, num_classes, num_classes + 1) for _ in c.stage_ious],
        [BoxCoder(stds, b.scale_clamp, b.plus_one, b.clip_offset) for stds in c.stage_stds],
        [Matcher(iou, iou) for iou in c.stage_ious],
        num_classes,
        refine_class=REFINE_RULES[c.refine_class],
        refine_box_dtype=getattr(torch, c.refine_box_dtype),
    )


def test_refinement_rounds_boxes_to_float16_before_decoding() -> None:
    heads = seed_heads()
    rois = torch.tensor([[0, 1100.3, 500.2, 1200.7, 600.9]])
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0]])
    zero = torch.zeros(1, 16)  # zero deltas: the decode returns its (rounded) input box
    sizes = torch.tensor([[768.0, 1280.0]])
    refined = heads.decode_stage(0, rois, logits, zero, sizes)
    torch.testing.assert_close(refined, rois[:, 1:].half().float())
    assert refined[0, 0] == 1100.0 and refined[0, 1] == 500.25  # float16 spacing: 1 px above 1024, 0.25 px above 256
    heads.refine_box_dtype = torch.float32
    torch.testing.assert_close(heads.decode_stage(0, rois, logits, zero, sizes), rois[:, 1:])


def test_argmax_with_background_refines_with_the_background_slot() -> None:
    heads = seed_heads(num_classes=3)
    rois = torch.tensor([[0, 100.0, 100.0, 199.0, 199.0], [0, 100.0, 100.0, 199.0, 199.0]])
    logits = torch.tensor([[0.0, 1.0, 0.0, 9.0], [0.0, 9.0, 0.0, 1.0]])  # background last: row 0 is background
    deltas = torch.zeros(2, 16)
    deltas[:, 12] = 1.0  # background slot (last group): dx = 1 -> shift by 0.1 * 100 px
    deltas[:, 4] = -1.0  # class 1: shift by -10 px
    refined = heads.decode_stage(0, rois, logits, deltas, torch.tensor([[768.0, 1280.0]]))
    assert refined[:, 0].tolist() == [110.0, 90.0]


def test_per_class_nms_equals_the_offset_trick() -> None:
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 20 + torch.rand(300, 2, generator=g) * 40], dim=1).repeat(1, 4)
    scores = torch.rand(300, 4, generator=g)
    offset = multiclass_nms(boxes, scores, 0.05, 0.5, 1000)
    per_class = multiclass_nms(boxes, scores, 0.05, 0.5, 1000, kind="per_class")
    for a, b in zip(offset, per_class):
        torch.testing.assert_close(a, b)


def test_coco_json_width_plus_one() -> None:
    box, score, label = torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([0.9]), torch.tensor([0])
    assert detections_to_coco(1, box, score, label, [1])[0]["bbox"] == [10.0, 20.0, 20.0, 40.0]
    assert detections_to_coco(1, box, score, label, [1], wh_plus_one=True)[0]["bbox"] == [10.0, 20.0, 21.0, 41.0]


# ---------------------------------------------------------------------------------------------------------------------
# Name and layout map


def mindspore_head_tensors(num_classes: int = 80, dim: int = 6) -> dict[str, np.ndarray]:
    """Small MindSpore-named head tensors whose values tell where they came from: [in, out] FC weights."""
    rng = np.random.default_rng(0)
    k = num_classes + 1
    tensors = {}
    for head in ("rcnn", "rcnn1", "rcnn2"):
        tensors[f"{head}.shared_fc_0.weight"] = rng.standard_normal((12, dim), dtype=np.float32)
        tensors[f"{head}.shared_fc_0.bias"] = rng.standard_normal(dim, dtype=np.float32)
        tensors[f"{head}.cls_scores.weight"] = rng.standard_normal((dim, k), dtype=np.float32)
        tensors[f"{head}.cls_scores.bias"] = rng.standard_normal(k, dtype=np.float32)
        tensors[f"{head}.reg_scores.weight"] = rng.standard_normal((dim, 4 * k), dtype=np.float32)
        tensors[f"{head}.reg_scores.bias"] = rng.standard_normal(4 * k, dtype=np.float32)
    tensors["rcnn.reg_scores_class_ang.weight"] = np.zeros((dim, 4), np.float32)
    return tensors


def test_head_layout_transposed_with_background_moved_last() -> None:
    ms = mindspore_head_tensors()
    sd, skipped = convert_mindspore_state_dict(ms)
    assert skipped == ["rcnn.reg_scores_class_ang.weight"]
    w_cls, b_cls = sd["roi_heads.box_heads.2.fc_cls.weight"].numpy(), sd["roi_heads.box_heads.2.fc_cls.bias"].numpy()
    ms_cls = ms["rcnn2.cls_scores.weight"]
    np.testing.assert_array_equal(w_cls[80], ms_cls[:, 0])  # background: MindSpore column 0 -> project row 80
    np.testing.assert_array_equal(w_cls[:80], ms_cls[:, 1:].T)  # class c: column c + 1 -> row c
    np.testing.assert_array_equal(b_cls[[80, 0, 79]], ms["rcnn2.cls_scores.bias"][[0, 1, 80]])
    w_reg = sd["roi_heads.box_heads.1.fc_reg.weight"].numpy()
    ms_reg = ms["rcnn1.reg_scores.weight"]
    np.testing.assert_array_equal(w_reg[320:324], ms_reg[:, 0:4].T)  # background group last
    np.testing.assert_array_equal(w_reg[4 * 7 : 4 * 8], ms_reg[:, 4 * 8 : 4 * 9].T)  # class 7 = MindSpore class 8
    fc0 = sd["roi_heads.box_heads.0.shared_fcs.0.weight"].numpy()
    np.testing.assert_array_equal(fc0, ms["rcnn.shared_fc_0.weight"].T)
    no_slot, _ = convert_mindspore_state_dict(ms, reg_background_slot=False)
    np.testing.assert_array_equal(no_slot["roi_heads.box_heads.1.fc_reg.weight"].numpy(), ms_reg[:, 4:].T)


def test_backbone_fpn_rpn_names() -> None:
    v = np.ones(4, np.float32)
    ms = {
        "backbone.bn1.moving_variance": v,
        "backbone.layer3.0.conv_down_sample.weight": v,
        "backbone.layer3.0.bn_down_sample.gamma": v,
        "backbone.layer4.2.bn3.moving_mean": v,
        "fpn_ncek.lateral_convs_list.3.bias": v,
        "fpn_ncek.fpn_convs_list.0.weight": v,
        "rpn_with_loss.rpn_convs_list.0.rpn_reg.weight": v,
        "rpn_with_loss.rpn_convs_list.1.rpn_reg.weight": v,  # an identical shared copy
        "something.else": v,
    }
    sd, skipped = convert_mindspore_state_dict(ms)
    assert sorted(sd) == sorted([
        "backbone.bn1.running_var", "backbone.layer3.0.downsample.0.weight", "backbone.layer3.0.downsample.1.weight",
        "backbone.layer4.2.bn3.running_mean", "fpn.lateral_convs.3.bias", "fpn.fpn_convs.0.weight",
        "rpn.head.bbox_pred.weight", "something.else",
    ])  # fmt: skip
    assert skipped == ["rpn_with_loss.rpn_convs_list.1.rpn_reg.weight"]
    ms["rpn_with_loss.rpn_convs_list.1.rpn_reg.weight"] = v * 2
    with pytest.raises(CheckpointError, match="shared"):
        convert_mindspore_state_dict(ms)


def test_a_ckpt_is_recognised_by_content_and_gets_the_mindspore_preset(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"  # not named .ckpt: the content decides
    write_mindspore_ckpt(path, {**mindspore_head_tensors(), "global_step": np.array([5], np.int32)})
    assert sniff_checkpoint_format(path) == "mindspore"
    checkpoint = load_checkpoint(path)
    assert (checkpoint.preset, checkpoint.source_format) == (PRESET, "mindspore")
    assert checkpoint.config == get_preset(PRESET)
    assert "global_step" not in checkpoint.state_dict
    with pytest.raises(CheckpointError, match="class-agnostic"):
        load_checkpoint(path, preset="cascade_rcnn_r101_fpn")
    other = load_checkpoint(path, preset="cascade_rcnn_r101_fpn_mindspore")
    assert other.preset == PRESET
