"""Inference optimisations keep the outputs: batch-norm folding, the channels-last inference copy, gather RoIAlign,
best-first NMS; the Detector's inference copy follows weight changes; FLOP counting and the benchmark's report."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d, box_iou, nms, roi_align

from cascade_rcnn.api import Detector, to_tensor_image
from cascade_rcnn.modeling.backbone import ResNetBackbone
from cascade_rcnn.benchmarks.bf16_accuracy import match_detections
from cascade_rcnn.benchmarks.calibrated_weights import calibrate_cascade, randomize_weights
from cascade_rcnn.benchmarks.inference import (
    build_torchvision_reference,
    count_flops,
    load_torchvision_reference,
    report,
    save_torchvision_reference,
)
from cascade_rcnn.commands.benchmark import parse_size
from cascade_rcnn.errors import ConfigError
from cascade_rcnn.deploy.optimize import PooledConv, fold_batch_norm, optimize_for_inference
from cascade_rcnn.modeling.postprocess import SPLIT_THRESHOLD, multiclass_nms
from cascade_rcnn.modeling.roi_align import MultiScaleRoIAlign, roi_align_channels_last
from cascade_rcnn.structures import Detections

COCO128 = Path(
    os.environ.get("CASCADE_RCNN_COCO128", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco128")
)
VAL = COCO128 / "val2017"
needs_coco128 = pytest.mark.skipif(
    not (VAL / "000000001000.jpg").is_file(),
    reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)",
)
TINY = {"transform.min_size": 128, "transform.max_size": 192}


def random_image(seed: int = 0, size: tuple[int, int] = (120, 170)) -> torch.Tensor:
    return torch.rand((3, *size), generator=torch.Generator().manual_seed(seed)) * 255


def test_fold_batch_norm_keeps_outputs() -> None:
    backbone = ResNetBackbone(50).eval()
    randomize_weights(backbone, seed=1)
    gen = torch.Generator().manual_seed(2)
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    x = torch.randn(1, 3, 96, 128, generator=gen)
    folded = fold_batch_norm(copy.deepcopy(backbone))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == 53  # the original is untouched
    with torch.no_grad():
        for a, b in zip(backbone(x), folded(x)):
            assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_inference_copy_shares_all_weights_and_leaves_model_unchanged() -> None:
    det = Detector(**TINY)
    before = {k: v.clone() for k, v in det.model.state_dict().items()}
    fast = optimize_for_inference(det.model)
    after = det.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Every tensor of the copy is one of the model's (folding happens at each call): no second copy of any weight.
    own = {id(t) for t in [*det.model.parameters(), *det.model.buffers()]}
    assert {id(t) for t in [*fast.parameters(), *fast.buffers()]} == own
    assert fast.backbone is not det.model.backbone
    assert isinstance(det.model.roi_heads.roi_align, MultiScaleRoIAlign)


def random_rois(n: int, width: float, height: float, batch: int, seed: int) -> torch.Tensor:
    """RoIs of all shapes: inside, across and outside the map, thin, huge, empty and inverted."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([width, height]) * 1.3 - 20
    wh = torch.rand(n, 2, generator=gen) ** 3 * torch.tensor([width, height]) * 1.5
    rois = torch.cat([torch.randint(0, batch, (n, 1), generator=gen).float(), xy, xy + wh], dim=1)
    rois[:4, 3:] = rois[:4, 1:3]  # empty
    rois[4:8, 3:] = rois[4:8, 1:3] - 3  # inverted
    rois[8:12, 1:] = torch.tensor([-50.0, -50.0, -10.0, -10.0])  # wholly outside
    rois[-3:, 3:] = rois[-3:, 1:3]  # empty bags at the very end
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("size", [(37, 23), (50, 76)])
def test_gather_roi_align_equals_torchvision(aligned: bool, sampling_ratio: int, size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(size) + sampling_ratio)
    feature = torch.randn(2, 16, *size, generator=gen)
    rois = random_rois(400, size[1] * 8, size[0] * 8, batch=2, seed=sampling_ratio)
    expected = roi_align(feature, rois, 7, 1 / 8, sampling_ratio, aligned)
    for layout in (torch.channels_last, torch.contiguous_format):
        out = roi_align_channels_last(feature.contiguous(memory_format=layout), rois, 7, 1 / 8, sampling_ratio, aligned)
        assert out.shape == expected.shape
        # Every sample placed and weighted as torchvision's: only summation order differs (1.6e-7 measured; the README
        # quotes this bound).
        assert (out - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert expected[8:12].abs().max() == 0  # the RoIs wholly outside the map pool zeros (the out-of-map rule)
    assert roi_align_channels_last(feature, rois[:0], 7, 1 / 8, sampling_ratio, aligned).shape == (0, 16, 7, 7)


def test_gather_roi_align_multi_level_matches_plain() -> None:
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 8, 64 // s, 96 // s, generator=gen) for s in (1, 2, 4, 8)]
    rois = random_rois(600, 380.0, 250.0, batch=2, seed=1)
    for plus_one, aligned in [(False, True), (True, False)]:
        plain = MultiScaleRoIAlign((4, 8, 16, 32), aligned=aligned, plus_one=plus_one, cpu_kernel="torchvision")
        gather = MultiScaleRoIAlign((4, 8, 16, 32), aligned=aligned, plus_one=plus_one)
        channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
        with torch.inference_mode():
            expected = plain(features, rois)
            out = gather(channels_last, rois)
        assert (out - expected).abs().max() <= 1e-6 * expected.abs().max()  # 1.8e-7 measured


def reference_multiclass_nms(boxes, scores, score_thresh, nms_thresh, max_detections):
    """mmcv's semantics written plainly: the offset trick below SPLIT_THRESHOLD candidates, a per-class loop above."""
    n, c = scores.shape
    boxes = boxes.reshape(n, -1, 4).expand(n, c, 4).reshape(-1, 4)
    labels = torch.arange(c).expand(n, c).reshape(-1)
    scores = scores.reshape(-1)
    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if boxes.shape[0] < SPLIT_THRESHOLD:
        keep = nms(boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None], scores, nms_thresh)
    else:
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for label in labels.unique():
            idx = torch.nonzero(labels == label).squeeze(1)
            mask[idx[nms(boxes[idx], scores[idx], nms_thresh)]] = True
        keep = torch.nonzero(mask).squeeze(1)
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
    keep = keep[:max_detections]
    return boxes[keep], scores[keep], labels[keep]


@pytest.mark.parametrize("score_thresh", [0.05, 0.001, 0.0])
@pytest.mark.parametrize("class_specific", [False, True])
def test_best_first_nms_equals_full_nms(score_thresh: float, class_specific: bool) -> None:
    gen = torch.Generator().manual_seed(int(score_thresh * 1000) + class_specific)
    n, c = 1000, 80
    xy = torch.rand(n, 2, generator=gen) * 600
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 150 + 2], dim=1)
    if class_specific:
        boxes = torch.cat([boxes + torch.randn(n, 4, generator=gen) * 3 for _ in range(c)], dim=1)
    logits = torch.randn(n, c + 1, generator=gen) * 4
    logits[:, c] += 8
    scores = logits.softmax(dim=1)[:, :c]
    scores[::7] = scores[::7].mul(64).round().div(64)  # exact ties too
    expected = reference_multiclass_nms(boxes, scores, score_thresh, 0.5, 100)
    got = multiclass_nms(boxes, scores, score_thresh, 0.5, 100)
    assert len(expected[0]) == 100
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@needs_coco128
def test_optimized_detector_matches_plain_one() -> None:
    det = Detector(**{"transform.min_size": 320, "transform.max_size": 512})
    calibrate_cascade(det.model, to_tensor_image(VAL / "000000001000.jpg"), delta_std=0.5, logit_std=2.5,
                      background_logit=6.0)  # fmt: skip
    paths = [VAL / "000000000139.jpg", VAL / "000000000632.jpg"]
    fast = det.predict(paths)
    det.optimize = False
    plain = det.predict(paths)
    for a, b in zip(plain, fast):
        assert len(a) == len(b) == 100
        iou = box_iou(a.boxes, b.boxes) * (a.labels[:, None] == b.labels[None, :])
        best, j = iou.max(dim=1)
        assert bool((best > 0.99).all())  # same detections, near-tied ones possibly in another order
        assert float((a.boxes - b.boxes[j]).abs().max()) < 5e-2
        assert float((a.scores - b.scores[j]).abs().max()) < 5e-4


def test_inference_copy_follows_weight_changes() -> None:
    det = Detector(**TINY, **{"postprocess.score_thresh": 0.0})
    image = random_image()
    det.predict(image)
    first = det.inference_model
    assert det.inference_model is first  # cached while the weights stay the same
    with torch.no_grad():
        fast = det.inference_model
        before = fast.fpn(fast.backbone.feature_maps(torch.zeros(1, 3, 64, 64) + 50))
        det.model.backbone.conv1.weight.mul_(2.0)
        det.model.backbone.bn1.running_var.mul_(3.0)
        after = fast.fpn(fast.backbone.feature_maps(torch.zeros(1, 3, 64, 64) + 50))
        expected = det.model.fpn(det.model.backbone(torch.zeros(1, 3, 64, 64) + 50))
    assert not torch.equal(before[0], after[0])
    for a, b in zip(after, expected):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_bf16_path_runs_with_float32_boxes() -> None:
    det = Detector(**TINY, bf16=True)
    with torch.no_grad():
        det.model.roi_heads.box_heads[-1].fc_cls.bias[:80] += 8.0  # some detections above the threshold
    out = det.predict(random_image())
    assert len(out) > 0 and out.boxes.dtype == torch.float32 and out.scores.dtype == torch.float32
    fast = det.inference_model
    head = fast.roi_heads.box_heads[0].body  # bfloat16 weights made once, equal to the model's rounded
    assert head.fc_cls.weight.dtype == torch.bfloat16
    assert torch.equal(head.fc_cls.weight, det.model.roi_heads.box_heads[0].fc_cls.weight.bfloat16())
    assert det.model.roi_heads.box_heads[0].fc_cls.weight.dtype == torch.float32  # the model itself is untouched


def test_flop_count_equals_conv_and_linear_macs() -> None:
    """FlopCounterMode (operator level) agrees with multiply-adds summed from every conv/linear call's shapes."""
    det = Detector(**TINY)
    model = det.model
    macs = []

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            k = module.weight[0].numel()
            macs.append(output.numel() * k)
        else:
            macs.append(output.numel() * module.in_features)

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.inference_mode():
        model.predict([random_image()])
    for h in handles:
        h.remove()
    with torch.inference_mode():
        flops = count_flops(lambda: model.predict([random_image()]))
    assert flops == 2 * sum(macs)
    assert len(macs) > 3 * 4  # the cascade's three stages (four linear layers each) were counted


def test_benchmark_report_and_size() -> None:
    assert parse_size("800x1333") == (800, 1333)
    with pytest.raises(ConfigError):
        parse_size("1333x800")
    paths = ("torch_fp32", "torch_fp32_masks", "torch_bf16", "onnxruntime", "torchvision_faster_rcnn")
    secs = dict(zip(paths, (4.0, 6.5, 8.0, 3.0, 4.2)))
    result = {
        "seconds_per_image": secs,
        "median_seconds_per_image": secs,
        "detections_per_image": dict.fromkeys(paths, 100.0),
        "ratio_vs_torchvision_fp32": 4.0 / 4.2,
        "onnxruntime_speedup": 4.0 / 3.0,
        "bf16_speedup": 0.5,
        "batch4_speedup": 1.1,
        "batch_size": 4,
        "gflops_per_image": 450.0,
        "achieved_gflops": 112.0,
        "matmul_gflops": 180.0,
        "matmul_fraction": 112.0 / 180.0,
        "params": 69_000_000,
        "peak_rss_mb": 1400.0,
        "peak_rss_mb_by_path": {"torch_fp32": 1400.0},
        "runtime_rss_mb_by_path": {"torch_fp32": 901.0},
        "mask_preset": "cascade_mask_rcnn_r50_fpn",
        "mask_extra_ms_per_image": 2500.0,
        "mask_extra_ms_per_image_median": 2450.0,
        "mask_time_ratio": 6.5 / 4.0,
        "mask_paste_ms_per_image": 40.0,
        "mask_gflops_per_image": 318.0,
        "mask_params": 7_900_000,
        "mask_peak_rss_extra_mb": 180.0,
        "openvino_fp32_speedup": 2.2,
        "int8_speedup": None,
        "int8_peak_rss_mb": None,
        "cpu_isa": ["avx2", "avx512f", "avx512_vnni"],
        "settings": {
            "preset": "p",
            "size": "800x1333",
            "threads": 2,
            "images": ["a", "b"],
            "detections": 100,
            "proposals": 1000,
            "calibration_image": "c",
            "cpu": "cpu",
            "torch": "2",
        },
    }
    text = report(result)
    for needle in ("ONNX Runtime", "bf16", "torchvision", "0.95", "GFLOP/s", "1400 MB", "901 MB", "69.0 M",
                   "+ masks", "+2500 ms", "paste 40 ms", "+318.0 GFLOP", "+180 MB", "<= +300 MB"):
        assert needle in text, needle
    no_masks = report({**result, "mask_preset": None, "mask_extra_ms_per_image": None})
    assert "+2500 ms" not in no_masks


def test_torchvision_reference_loads_like_ours_and_detects_the_same(tmp_path: Path) -> None:
    """The benchmark's memory child loads torchvision's model as `Detector.from_weights` loads ours (meta device, the
    file's tensors assigned): the model it measures is the one that was timed."""
    settings = (96, 128, 50, 20)
    original = build_torchvision_reference(*settings)
    path = save_torchvision_reference(original, settings, tmp_path / "tv.safetensors")
    loaded = load_torchvision_reference(path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    image = random_image(3) / 255.0
    with torch.inference_mode():
        expected, got = original([image])[0], loaded([image])[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(expected[key], got[key]), key


@needs_coco128
def test_benchmark_command_writes_every_figure(tmp_path: Path) -> None:
    """`cascade-rcnn benchmark` end to end at a tiny size, with the preset's mask sibling timed beside it (detectron2's:
    one head, the cheaper); timings and memory themselves are the output, not checked."""
    import json

    from cascade_rcnn.cli import main

    out = tmp_path / "bench.json"
    args = ["benchmark", "--images", str(VAL), "--num-images", "1", "--size", "96x128", "--batch", "2", "--no-onnx",
            "--no-openvino", "--preset", "cascade_rcnn_r50_fpn_detectron2", "--memory-runs", "1"]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("ratio_vs_torchvision_fp32", "matmul_gflops", "achieved_gflops", "matmul_fraction", "bf16_speedup",
                "batch2_speedup", "gflops_per_image", "params", "peak_rss_mb"):
        assert result[key] > 0, key
    assert result["seconds_per_image"]["onnxruntime"] is None and result["onnxruntime_speedup"] is None
    assert result["batch_size"] == 2 and "batch4_speedup" not in result  # the key names the batch it measured
    assert all(result["seconds_per_image"][k] > 0 for k in ("torch_fp32", "torch_bf16", "torchvision_faster_rcnn"))
    assert 0 < result["runtime_rss_mb_by_path"]["torch_fp32"] < result["peak_rss_mb"]
    assert result["detections_per_image"]["torch_fp32"] == 100  # calibrated weights at score threshold 0: full work
    # What masks add.
    assert result["mask_preset"] == "cascade_mask_rcnn_r50_fpn_detectron2"
    assert result["detections_per_image"]["torch_fp32_masks"] == 100
    # One head of 4 convs (256 channels, 14 x 14), a 2x upsampling and 80 class maps on 100 RoIs: 107 GFLOP.
    assert 100 < result["mask_gflops_per_image"] < 115
    assert result["mask_params"] == 4 * (256 * 256 * 9 + 256) + 256 * 256 * 4 + 256 + 256 * 80 + 80
    for key in ("mask_extra_ms_per_image", "mask_extra_ms_per_image_median", "mask_time_ratio",
                "mask_peak_rss_extra_mb"):
        assert isinstance(result[key], float), key
    assert result["mask_paste_ms_per_image"] > 0 and result["peak_rss_mb_by_path"]["torch_fp32_masks"] > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # the ONNX exporter traces the same way
def test_box_heads_first_fc_as_a_convolution() -> None:
    """The inference copy's box heads take their first fc as a 7 x 7 convolution on the pooled maps (oneDNN's kernel):
    the same outputs up to float rounding, in either memory format; a change to the model's weights reaches it; the
    model's own heads, their parameters and names, are untouched; the traced (ONNX) form is the plain product."""
    det = Detector(**TINY)
    model = det.model
    fast = optimize_for_inference(model)
    gen = torch.Generator().manual_seed(0)
    pooled = torch.randn(37, 256, 7, 7, generator=gen)
    for head, fast_head in zip(model.roi_heads.box_heads, fast.roi_heads.box_heads, strict=True):
        assert head.pooled_fc is None and isinstance(fast_head.pooled_fc, PooledConv)
        with torch.no_grad():
            torch.nn.init.normal_(head.shared_fcs[0].weight, std=0.01)
            torch.nn.init.normal_(head.shared_fcs[0].bias, std=0.1)
            expected = head(pooled)
            for x in (pooled, pooled.contiguous(memory_format=torch.channels_last)):
                for got, want in zip(fast_head(x), expected):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            traced = torch.jit.trace(fast_head.pooled_fc, pooled)
            graph = str(traced.inlined_graph)
            assert "aten::linear" in graph and "conv" not in graph.replace("PooledConv", "")
    assert set(dict(model.named_parameters())) == set(dict(Detector(**TINY).model.named_parameters()))


def test_rois_in_chunks_equal_all_at_once() -> None:
    det = Detector(**TINY)
    heads = optimize_for_inference(det.model).roi_heads
    gen = torch.Generator().manual_seed(3)
    features = [torch.randn(1, 256, 48 // s, 64 // s, generator=gen) for s in (1, 2, 4, 8)]
    rois = torch.cat([torch.zeros(700, 1), random_rois(700, 250.0, 190.0, batch=1, seed=4)[:, 1:]], dim=1)
    with torch.inference_mode():
        heads.rois_per_chunk = None
        whole = heads.run_stage(1, features, rois)
        heads.rois_per_chunk = 256  # 3 chunks, the last one short
        chunked = heads.run_stage(1, features, rois)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_match_detections_counts_and_measures_what_bf16_reproduces() -> None:
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [100.0, 20.0, 160.0, 90.0], [5.0, 5.0, 30.0, 30.0],
                          [200.0, 200.0, 240.0, 260.0]])  # fmt: skip
    reference = Detections(boxes, torch.tensor([0.9, 0.8, 0.5, 0.1]), torch.tensor([1, 2, 0, 1]))
    assert match_detections([reference], [reference]).matched == 3  # the one below min_score is not counted
    same = match_detections([reference], [reference])
    assert same.reference == 3 and float(same.box_diffs.max()) == 0 and float(same.score_diffs.max()) == 0
    moved = boxes.clone()
    moved[0] += torch.tensor([0.5, 0.0, -0.25, 0.0])  # IoU 0.98: found, 0.5 px off
    moved[1, 2:] += 30.0  # IoU 0.47: not found
    other = Detections(moved, torch.tensor([0.85, 0.8, 0.5, 0.1]), torch.tensor([1, 2, 1, 1]))  # third: other label
    agreement = match_detections([reference], [other])
    assert (agreement.reference, agreement.matched) == (3, 1)
    assert agreement.box_diffs.tolist() == [0.5] and torch.allclose(agreement.score_diffs, torch.tensor([0.05]))
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert match_detections([reference, empty], [empty, reference]).matched == 0


def test_bf16_accuracy_command_writes_every_figure(tmp_path: Path) -> None:
    """`cascade-rcnn benchmark --bf16-accuracy` end to end on an untrained tiny model and three synthetic images."""
    import json

    from cascade_rcnn.cli import main
    from cascade_rcnn.data.synthetic import CLASS_NAMES, make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", num_train=0, num_val=3, image_size=(128, 128))
    det = Detector(**TINY, num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES)
    with torch.no_grad():
        for head in det.model.roi_heads.box_heads:
            head.fc_cls.bias[0] += 8.0  # class 0 detections scoring above 0.3
    weights = det.save(tmp_path / "model.safetensors")
    out = tmp_path / "bf16.json"
    args = ["benchmark", "--bf16-accuracy", str(weights), "--images", str(data["val_images"]), "--annotations",
            str(data["val_annotations"]), "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 3
    assert all(0.0 <= result[metric][path] <= 1.0 for metric in ("AP", "AP50") for path in ("fp32", "bf16"))
    assert 0 < result["matched_in_bf16"] <= result["fp32_detections_above_min_score"]
    assert 0.0 <= result["box_diff_px"]["median"] <= result["box_diff_px"]["p99"] <= result["box_diff_px"]["max"]
    assert main(["benchmark", "--bf16-accuracy", str(weights), "--images", str(data["val_images"])]) == 2
