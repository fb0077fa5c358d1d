"""Calibrated random weights, FLOP counting and the CPU benchmark behind `cascade-rcnn benchmark`.

Untrained weights make a detector degenerate: objectness and class scores sit near one value, NMS keeps a handful of
boxes and nothing passes the score threshold, which fakes a speed-up. `calibrate_cascade` and `calibrate_torchvision`
give any model of either family weights that behave like a trained model's in the work they cause, as the mmdet
reference recipe did (shared/reference/mmdet/README.md, "How the values were chosen"):

- convolution and linear weights N(0, 2 / fan_in), biases N(0, 0.01^2); frozen batch-norm gamma U(0.5, 1.5) (U(0.1, 0.3)
  on the last norm of a residual branch), beta N(0, 0.1^2);
- frozen batch-norm running statistics = the batch statistics of one forward pass on a calibration image;
- on that image, the RPN objectness logits scaled to std 1.5 and centred per anchor, minus 3; RPN deltas std 0.15;
  each box head's class logits scaled to std 4 and centred per class, with +10 on background; its deltas std 1.5.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

# ---------------------------------------------------------------------------------------------------------------------
# Calibrated random weights


def randomize_weights(model: nn.Module, seed: int = 0) -> None:
    """Re-draw every conv/linear weight and bias and every frozen batch-norm affine, in place (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.01)
            elif isinstance(module, FrozenBatchNorm2d):
                # Small gamma on the norm that ends a residual branch keeps activations bounded through 16+ blocks.
                low, high = (0.1, 0.3) if name.endswith(("bn3", "downsample.1")) else (0.5, 1.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * (high - low) + low)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)


@dataclass
class OutputCalibration:
    """How to rescale one conv/linear layer so its outputs on the calibration image have a given spread.

    The weight is multiplied by one scalar so that the outputs (bias excluded; centred per output channel when
    `centre`) have std `std`; the bias becomes `shift` (per output channel), minus the per-channel mean of the rescaled
    outputs when `centre`.
    """

    layer: nn.Module
    std: float
    centre: bool = False
    shift: Tensor | float = 0.0

    def apply(self, outputs: Tensor) -> tuple[float, Tensor]:
        """Rescale the layer for its bias-free `outputs` (R, C); returns the weight scale and the new bias."""
        mean = outputs.mean(dim=0) if self.centre else torch.zeros(outputs.shape[1])
        scale = self.std / max((outputs - mean).std().item(), 1e-12)
        bias = torch.zeros(outputs.shape[1]) + self.shift - mean * scale
        with torch.no_grad():
            self.layer.weight.mul_(scale)
            if self.layer.bias is not None:
                self.layer.bias.copy_(bias)
        return scale, bias


def _bias_free_rows(module: nn.Module, output: Tensor) -> Tensor:
    """A conv's (B, C, H, W) or a linear's (N, C) output as (rows, C), with the layer's bias taken off."""
    out = output.detach().float()
    if out.dim() == 4:
        out = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return out if module.bias is None else out - module.bias.detach().float()


def calibrate(
    model: nn.Module,
    forward: Callable[[], object],
    dense: list[OutputCalibration],
    heads: list[OutputCalibration],
) -> None:
    """Calibrate `model` in two forward passes.

    Pass 1 sets every FrozenBatchNorm2d's running mean/var to the batch statistics (unbiased variance) of its input, in
    execution order so each sees already-calibrated inputs, and collects the outputs of the `dense` layers (the RPN
    head's, called once per level; rescaled after the pass, as nothing in that pass depends on them). Pass 2 rescales
    each of `heads` (layers called once per forward, e.g. one per cascade stage) inside the pass, so a later stage
    sees the calibrated outputs of the earlier ones.
    """
    collected: dict[int, list[Tensor]] = {id(c.layer): [] for c in dense}

    def set_stats(module: FrozenBatchNorm2d, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach().float().transpose(0, 1).flatten(1)
        module.running_mean.copy_(x.mean(dim=1))
        module.running_var.copy_(x.var(dim=1))

    def collect(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        collected[id(module)].append(_bias_free_rows(module, output))

    by_layer = {id(c.layer): c for c in heads}
    done: set[int] = set()

    def rescale(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if id(module) in done:
            raise RuntimeError(f"calibration: {module} is called more than once per forward")
        done.add(id(module))
        rows = _bias_free_rows(module, output)
        scale, bias = by_layer[id(module)].apply(rows)
        return (rows * scale + bias).reshape(output.shape).to(output.dtype)

    with torch.inference_mode(False), torch.no_grad():
        handles = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        handles += [c.layer.register_forward_hook(collect) for c in dense]
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
        for c in dense:
            if not collected[id(c.layer)]:
                raise RuntimeError(f"calibration: {c.layer} was not called")
            c.apply(torch.cat(collected[id(c.layer)]))
        handles = [c.layer.register_forward_hook(rescale) for c in heads]
        try:
            forward()
        finally:
            for h in handles:
                h.remove()


def calibrate_cascade(
    model: nn.Module,
    image: Tensor,
    seed: int = 0,
    delta_std: float = 1.5,
    logit_std: float = 4.0,
    background_logit: float = 10.0,
) -> None:
    """Give a `CascadeRCNN` calibrated random weights on `image` ((3, H, W) RGB 0-255, any size: the model resizes it).

    `delta_std` is the spread of the box heads' raw deltas, `logit_std` that of their class logits, and
    `background_logit` the background's offset. A random network's rounding errors grow with its logits, and its
    features change within a pixel, so a box error becomes a feature error at the next stage: smaller values give
    better-conditioned weights (for comparing two implementations) with as many detections.
    """
    model.eval()
    randomize_weights(model, seed)
    rpn = model.rpn.head
    dense = [OutputCalibration(rpn.cls_logits, 1.5, True, -3.0), OutputCalibration(rpn.bbox_pred, 0.15)]
    heads = []
    for head in model.roi_heads.box_heads:
        num_classes = head.fc_cls.out_features - 1
        shift = torch.zeros(num_classes + 1)
        shift[num_classes] = background_logit  # background is the last column
        heads += [OutputCalibration(head.fc_cls, logit_std, True, shift), OutputCalibration(head.fc_reg, delta_std)]
    calibrate(model, lambda: model.predict([image]), dense, heads)


def calibrate_torchvision(model: nn.Module, image: Tensor, seed: int = 0) -> None:
    """The same calibration for a torchvision `FasterRCNN` (background is its class 0)."""
    model.eval()
    randomize_weights(model, seed)
    rpn, predictor = model.rpn.head, model.roi_heads.box_predictor
    shift = torch.zeros(predictor.cls_score.out_features)
    shift[0] = 10.0
    dense = [OutputCalibration(rpn.cls_logits, 1.5, True, -3.0), OutputCalibration(rpn.bbox_pred, 0.15)]
    heads = [OutputCalibration(predictor.cls_score, 4.0, True, shift), OutputCalibration(predictor.bbox_pred, 1.5)]
    calibrate(model, lambda: model([image / 255.0]), dense, heads)


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs


def count_flops(forward: Callable[[], object]) -> int:
    """FLOPs of one call of `forward` (2 per multiply-add), counted at the operator level by
    `torch.utils.flop_counter.FlopCounterMode`: every convolution and matrix product (linear layers, matmul, bmm)
    with its real shapes, through any Python control flow, so it works on a cascade where hook- or trace-based
    counters see one stage or none. RoIAlign, NMS and element-wise ops are not counted (a few % of the work)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        forward()
    return int(mode.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_gflops(threads: int, size: int = 2048, seconds: float = 1.0) -> float:
    """This CPU's fp32 matrix-multiply rate (GFLOP/s) with `threads` threads: the best of repeated size^3 products."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        torch.mm(a, b)  # warm-up
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds or best == float("inf"):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        return 2.0 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark

CALIBRATION_IMAGE = "000000001000.jpg"  # the mmdet reference's calibration image: outside its (and our) timed set
PATHS = ("torch_fp32", "torch_bf16", "onnxruntime", "torchvision_faster_rcnn")


@dataclass
class BenchmarkSettings:
    images: list[Path]  # timed images
    calibration_image: Path
    preset: str = "cascade_rcnn_r50_fpn"
    min_size: int = 800
    max_size: int = 1333
    threads: int = 2
    proposals: int = 1000
    detections: int = 100
    batch: int = 4
    bf16: bool = True
    onnx: bool = True
    torchvision: bool = True
    seed: int = 0


def build_torchvision_reference(min_size: int, max_size: int, proposals: int, detections: int) -> nn.Module:
    """torchvision's Faster R-CNN R50-FPN as `fasterrcnn_resnet50_fpn` builds it for pretrained weights (ResNet-50 with
    FrozenBatchNorm2d, FPN from layer1..4, three trainable stages), without downloading any; score threshold 0."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    return FasterRCNN(
        backbone,
        num_classes=91,
        min_size=min_size,
        max_size=max_size,
        rpn_pre_nms_top_n_test=proposals,
        rpn_post_nms_top_n_test=proposals,
        box_score_thresh=0.0,
        box_detections_per_img=detections,
    ).eval()


def cpu_description() -> str:
    """CPU model and the instruction sets that matter here (from /proc/cpuinfo where there is one)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    have = [f for f in wanted if f in flags]
    lacking = [f for f in ("avx512_bf16", "amx_bf16") if f not in flags]
    return f"{name} ({', '.join(have) or 'no avx2'}{'; no ' + '/'.join(lacking) if lacking and flags else ''})"


def peak_rss_child(kind: str, weights: str, image: str, threads: int) -> tuple[float, float]:
    """In a fresh process: load `weights`, detect on `image`. Returns the process's peak resident memory in MB, and
    its resident memory once Python, torch, torchvision and this package are imported (before any model exists)."""
    from cascade_rcnn.api import Detector, to_tensor_image

    runtime = _proc_status_mb("VmRSS")
    torch.set_num_threads(threads)
    img = to_tensor_image(image)
    if kind == "torch_fp32":
        Detector.from_weights(weights).predict(img)
    else:
        meta = torch.load(weights, weights_only=True)
        model = build_torchvision_reference(*meta["settings"])
        model.load_state_dict(meta["state_dict"])
        with torch.inference_mode():
            model([img / 255.0])
    # This process image's own high-water mark (ru_maxrss would include the parent's, kept across fork + exec).
    return _proc_status_mb("VmHWM"), runtime


def _proc_status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB (ru_maxrss where there is no /proc)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            return next(float(line.split()[1]) / 1024.0 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure_peak_rss(kind: str, weights: Path, image: Path, threads: int) -> tuple[float, float]:
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json; from cascade_rcnn.benchmarks.inference import peak_rss_child; "
        f"print(json.dumps(peak_rss_child({kind!r}, {str(weights)!r}, {str(image)!r}, {threads})))"
    )
    env = dict(os.environ)
    # The child imports this package from where this process found it.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child process failed:\n{out.stderr[-2000:]}")
    peak, runtime = json.loads(out.stdout.strip().splitlines()[-1])
    return float(peak), float(runtime)


def run_benchmark(settings: BenchmarkSettings, log: Callable[[str], None] = print) -> dict:
    """Time every path on the same images, interleaved image by image, and collect the figures of `report`."""
    import statistics
    import tempfile

    from cascade_rcnn.api import Detector, to_tensor_image

    s = settings
    torch.set_num_threads(s.threads)
    overrides = {
        "transform.min_size": s.min_size,
        "transform.max_size": s.max_size,
        "postprocess.score_thresh": 0.0,
        "postprocess.detections_per_image": s.detections,
        "rpn.pre_nms_top_n_test": s.proposals,
        "rpn.post_nms_top_n_test": s.proposals,
    }
    calibration = to_tensor_image(s.calibration_image)
    images = [to_tensor_image(p) for p in s.images]
    log(f"calibrating random weights on {s.calibration_image.name} ...")
    fp32 = Detector(s.preset, **overrides)
    calibrate_cascade(fp32.model, calibration, s.seed)
    runners: dict[str, Callable[[Tensor], object]] = {"torch_fp32": fp32.predict}
    bf16 = None
    if s.bf16:
        bf16 = Detector(config=fp32.config, bf16=True)
        bf16.model = fp32.model  # the same weights
        runners["torch_bf16"] = bf16.predict
    tmp = tempfile.TemporaryDirectory(prefix="cascade_rcnn_bench_")
    work = Path(tmp.name)
    if s.onnx:
        from cascade_rcnn.deploy.backends import OnnxDetector
        from cascade_rcnn.deploy.onnx_export import export_onnx

        log("exporting to ONNX ...")
        onnx_path = export_onnx(fp32.model, work / "model.onnx", config=fp32.config, preset=s.preset)
        runners["onnxruntime"] = OnnxDetector(onnx_path, threads=s.threads).predict
    tv = None
    if s.torchvision:
        tv_settings = (s.min_size, s.max_size, s.proposals, s.detections)
        tv = build_torchvision_reference(*tv_settings)
        calibrate_torchvision(tv, calibration, s.seed)
        runners["torchvision_faster_rcnn"] = lambda img: tv([img / 255.0])

    log("warming up ...")
    with torch.inference_mode():
        for run in runners.values():
            run(calibration)
    times: dict[str, list[float]] = {name: [] for name in runners}
    detections: dict[str, list[int]] = {name: [] for name in runners}
    matmul_rates = [matmul_gflops(s.threads, seconds=0.5)]
    for i, (path, img) in enumerate(zip(s.images, images)):
        matmul_rates.append(matmul_gflops(s.threads, seconds=0.5))  # the CPU's rate now, as load varies
        for name, run in runners.items():
            start = time.perf_counter()
            with torch.inference_mode():
                out = run(img)
            times[name].append(time.perf_counter() - start)
            detections[name].append(len(out[0]["boxes"]) if isinstance(out, list) else len(out))
        log(f"  image {i + 1}/{len(images)} {path.name}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))

    # Batch of `batch` images with equal padded size (the Detector runs only those together), against the same images
    # one by one, measured back to back.
    transform = fp32.model.transform
    by_size: dict[tuple[int, int], list[Tensor]] = {}
    for img in images:
        h, w = transform.resized_size(*img.shape[-2:])
        by_size.setdefault((-(-h // 32), -(-w // 32)), []).append(img)
    group = max(by_size.values(), key=len)
    group = (group * s.batch)[: s.batch]
    with torch.inference_mode():
        start = time.perf_counter()
        for img in group:
            fp32.predict(img)
        single = time.perf_counter() - start
        start = time.perf_counter()
        fp32.predict(group, batch_size=s.batch)
        batched = time.perf_counter() - start
    log(f"  batch of {s.batch}: {batched:.2f}s, one by one {single:.2f}s")

    log("counting FLOPs ...")
    flops_by_size: dict[tuple[int, ...], int] = {}
    tv_flops_by_size: dict[tuple[int, ...], int] = {}
    flops, tv_flops = [], []
    for img in images:
        key = tuple(img.shape)
        if key not in flops_by_size:
            with torch.inference_mode():
                flops_by_size[key] = count_flops(lambda img=img: fp32.predict(img))
                if tv is not None:
                    tv_flops_by_size[key] = count_flops(lambda img=img: tv([img / 255.0]))
        flops.append(flops_by_size[key])
        if tv is not None:
            tv_flops.append(tv_flops_by_size[key])
    matmul = statistics.median([*matmul_rates, matmul_gflops(s.threads, seconds=0.5)])

    log("measuring peak memory in fresh processes ...")
    weights = fp32.save(work / "weights.safetensors")
    measured = {"torch_fp32": _measure_peak_rss("torch_fp32", weights, s.images[0], s.threads)}
    if tv is not None:
        tv_weights = work / "torchvision.pt"
        torch.save({"settings": tv_settings, "state_dict": tv.state_dict()}, tv_weights)
        measured["torchvision_faster_rcnn"] = _measure_peak_rss("torchvision", tv_weights, s.images[0], s.threads)
    tmp.cleanup()
    rss = {name: peak for name, (peak, _) in measured.items()}

    mean = {name: statistics.fmean(t) for name, t in times.items()}
    achieved = statistics.fmean(f / t for f, t in zip(flops, times["torch_fp32"])) / 1e9

    def ratio(a: str, b: str) -> float | None:
        return mean[a] / mean[b] if a in mean and b in mean else None

    result = {
        "seconds_per_image": {name: mean.get(name) for name in PATHS},
        "median_seconds_per_image": {name: statistics.median(t) for name, t in times.items()},
        "ratio_vs_torchvision_fp32": ratio("torch_fp32", "torchvision_faster_rcnn"),
        "onnxruntime_speedup": ratio("torch_fp32", "onnxruntime"),
        "bf16_speedup": ratio("torch_fp32", "torch_bf16"),
        "batch4_speedup": single / batched,
        "batch_size": s.batch,
        "gflops_per_image": statistics.fmean(flops) / 1e9,
        "achieved_gflops": achieved,
        "matmul_gflops": matmul,
        "matmul_fraction": achieved / matmul,
        "params": count_parameters(fp32.model),
        "peak_rss_mb": rss["torch_fp32"],
        "peak_rss_mb_by_path": rss,
        # What the process holds before any model exists: the floor under every path's peak.
        "runtime_rss_mb_by_path": {name: runtime for name, (_, runtime) in measured.items()},
        "detections_per_image": {name: statistics.fmean(d) for name, d in detections.items()},
        "settings": {
            "preset": s.preset,
            "size": f"{s.min_size}x{s.max_size}",
            "threads": s.threads,
            "proposals": s.proposals,
            "detections": s.detections,
            "score_thresh": 0.0,
            "images": [p.name for p in s.images],
            "calibration_image": s.calibration_image.name,
            "cpu": cpu_description(),
            "torch": torch.__version__,
        },
        "per_image_seconds": times,
    }
    if tv is not None:
        result["torchvision_gflops_per_image"] = statistics.fmean(tv_flops) / 1e9
        result["torchvision_params"] = count_parameters(tv)
        result["torchvision_achieved_gflops"] = (
            statistics.fmean(f / t for f, t in zip(tv_flops, times["torchvision_faster_rcnn"])) / 1e9
        )
    return result


def report(result: dict) -> str:
    """The benchmark's figures as a text table."""
    s = result["settings"]
    secs, fp32 = result["seconds_per_image"], result["seconds_per_image"]["torch_fp32"]
    labels = {
        "torch_fp32": "ours, PyTorch fp32",
        "torch_bf16": "ours, PyTorch bf16 autocast",
        "onnxruntime": "ours, ONNX Runtime",
        "torchvision_faster_rcnn": "torchvision Faster R-CNN R50-FPN",
    }
    lines = [
        (
            f"Cascade R-CNN CPU benchmark: {s['preset']}, size {s['size']} (short x long side), "
            f"{s['threads']} threads, {len(s['images'])} images, interleaved image by image"
        ),
        (
            f"calibrated random weights (calibrated on {s['calibration_image']}, not timed), score threshold 0, "
            f"{s['detections']} detections, {s['proposals']} proposals"
        ),
        f"CPU: {s['cpu']}; torch {s['torch']}",
        "",
        f"{'path':36s} {'s/image':>8s} {'median':>8s} {'vs fp32':>8s} {'dets/img':>9s}",
    ]
    for name, label in labels.items():
        if secs.get(name) is None:
            lines.append(f"{label:36s} {'skipped':>8s}")
            continue
        lines.append(
            f"{label:36s} {secs[name]:8.3f} {result['median_seconds_per_image'][name]:8.3f} "
            f"{fp32 / secs[name]:7.2f}x {result['detections_per_image'][name]:9.1f}"
        )

    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines += [
        "",
        f"ours fp32 / torchvision fp32 time:    {fmt(result['ratio_vs_torchvision_fp32'])}   (target <= 0.95)",
        f"ONNX Runtime speed-up over fp32:      {fmt(result['onnxruntime_speedup'])}x  (target >= 1.3)",
        f"bf16 speed-up over fp32:              {fmt(result['bf16_speedup'])}x  (target >= 1.6)",
        f"batch of {result['batch_size']} vs one by one:      {fmt(result['batch4_speedup'])}x  (target >= 1.2)",
        (
            f"FLOPs per image (ours):               {result['gflops_per_image']:.1f} GFLOP "
            f"(conv + matmul, FlopCounterMode); params {result['params'] / 1e6:.1f} M"
        ),
    ]
    if "torchvision_gflops_per_image" in result:
        lines.append(
            f"FLOPs per image (torchvision):        {result['torchvision_gflops_per_image']:.1f} GFLOP; "
            f"params {result['torchvision_params'] / 1e6:.1f} M; "
            f"achieved {result['torchvision_achieved_gflops']:.1f} "
            f"GFLOP/s ({result['torchvision_achieved_gflops'] / result['matmul_gflops']:.2f} of matmul)"
        )
    lines += [
        f"achieved (ours fp32):                 {result['achieved_gflops']:.1f} GFLOP/s",
        f"fp32 matmul rate, this run (median):  {result['matmul_gflops']:.1f} GFLOP/s",
        f"achieved / matmul rate:               {result['matmul_fraction']:.2f}  (target >= 0.6)",
        "peak resident memory, one image:      "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in result["peak_rss_mb_by_path"].items())
        + "  (target <= 1500 MB for ours)",
    ]
    if "runtime_rss_mb_by_path" in result:
        lines.append(
            "  of which Python + torch + torchvision:  "
            + ", ".join(f"{k} {v:.0f} MB" for k, v in result["runtime_rss_mb_by_path"].items())
            + " (imported, before any model exists)"
        )
    return "\n".join(lines)
