"""FLOP counting and the CPU inference benchmark behind `cascade-rcnn benchmark`.

Every model gets calibrated random weights (`cascade_rcnn.benchmarks.calibrated_weights`), so that all do a trained
model's post-processing work.

What masks cost: beside the box model, the benchmark times the preset's Cascade Mask R-CNN sibling
(`cascade_rcnn_r50_fpn` -> `cascade_mask_rcnn_r50_fpn`) with the box model's own weights, interleaved image by image
with the other paths: same boxes, so the difference is the mask heads on the final detections and the pasting of
their masks into the image (`mask_extra_ms_per_image`; the paste alone is timed as well). Its peak memory is measured
in a fresh process like the box model's (`mask_peak_rss_extra_mb`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from cascade_rcnn.benchmarks.calibrated_weights import calibrate_cascade, calibrate_torchvision
from cascade_rcnn.benchmarks.memory import peak_rss_in_child, proc_status_mb
from cascade_rcnn.config import PRESETS
from cascade_rcnn.modeling.masks import paste_masks

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
PATHS = (
    "torch_fp32", "torch_fp32_masks", "torch_bf16", "onnxruntime", "openvino_fp32", "openvino_int8",
    "torchvision_faster_rcnn",
)  # fmt: skip


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
    openvino: bool = True  # OpenVINO fp32 (`cascade_rcnn.deploy.openvino`)
    int8: bool = True  # OpenVINO int8, calibrated on `int8_calibration_images` (`cascade_rcnn.deploy.quantize`)
    int8_calibration_images: list[Path] | None = None  # default: the calibration image alone
    torchvision: bool = True
    masks: bool = True  # time the preset's mask sibling too (`mask_preset_of`)
    memory_runs: int = 3  # fresh processes measuring the box and the mask model's peak memory, each (the median)
    seed: int = 0


def mask_preset_of(preset: str) -> str | None:
    """The Cascade Mask R-CNN preset with `preset`'s box path (`cascade_rcnn_r50_fpn` -> `cascade_mask_rcnn_r50_fpn`),
    or None where there is none (the preset is a mask preset already, or has no mask sibling)."""
    if not preset.startswith("cascade_rcnn_"):
        return None
    name = "cascade_mask_rcnn_" + preset.removeprefix("cascade_rcnn_")
    return name if name in PRESETS else None


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


def save_torchvision_reference(model: nn.Module, settings: tuple[int, int, int, int], path: Path) -> Path:
    """Write a `build_torchvision_reference` model as safetensors, its four settings in the metadata: the same kind of
    file as ours, read by the same reader (`load_torchvision_reference`)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"settings": json.dumps(list(settings))})
    return path


def load_torchvision_reference(path: Path) -> nn.Module:
    """A `save_torchvision_reference` file loaded as `Detector.from_weights` loads ours: the file read into memory of
    its own, the model built on the meta device (no random initialisation), and the file's tensors handed to it, so
    one copy of the weights exists, and none once the model is dropped."""
    from cascade_rcnn.io.weights import read_safetensors

    state_dict, metadata = read_safetensors(path)
    with torch.device("meta"):
        model = build_torchvision_reference(*json.loads(metadata["settings"]))
    model.load_state_dict(state_dict, assign=True)
    # The anchor generator's cell anchors are plain attributes made in its constructor (meta tensors here): make them
    # again on the CPU, as our model makes its config's constants.
    anchors = model.rpn.anchor_generator
    anchors.cell_anchors = [
        anchors.generate_anchors(size, ratios) for size, ratios in zip(anchors.sizes, anchors.aspect_ratios)
    ]
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        raise RuntimeError(f"torchvision reference: no values for {', '.join(unset[:5])}")
    return model.eval()


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
    its resident memory once Python, torch, torchvision and this package are imported (before any model exists).

    Both kinds load alike (a safetensors file read into private memory, the model built on the meta device and
    given the file's tensors): one copy of the weights is alive during inference, whichever model it is."""
    from cascade_rcnn.api import Detector, to_tensor_image

    runtime = proc_status_mb("VmRSS")
    torch.set_num_threads(threads)
    img = to_tensor_image(image)
    if kind == "torch_fp32":
        Detector.from_weights(weights).predict(img)
    elif kind == "openvino":  # fp32 or int8 IR: the weights OpenVINO holds compiled, read from the .bin
        from cascade_rcnn.deploy.openvino import OpenVinoDetector

        OpenVinoDetector(weights, threads=threads).predict(img)
    else:
        model = load_torchvision_reference(Path(weights))
        with torch.inference_mode():
            model([img / 255.0])
    # This process image's own high-water mark (ru_maxrss would include the parent's, kept across fork + exec).
    return proc_status_mb("VmHWM"), runtime


def _measure_peak_rss(kind: str, weights: Path, image: Path, threads: int) -> tuple[float, float]:
    return peak_rss_in_child(
        "cascade_rcnn.benchmarks.inference", f"peak_rss_child({kind!r}, {str(weights)!r}, {str(image)!r}, {threads})"
    )


def run_benchmark(settings: BenchmarkSettings, log: Callable[[str], None] = print) -> dict:
    """Time every path on the same images, interleaved image by image, and collect the figures of `report`."""
    import statistics
    import tempfile

    from cascade_rcnn.api import Detector, to_tensor_image
    from cascade_rcnn.deploy.extras import cpu_isa, require

    s = settings
    if s.onnx:  # before any work: one line naming the extra (or the flag that skips the path)
        require("onnx", extra="onnx", what="the ONNX Runtime path (--no-onnx skips it)")
        require("onnxruntime", extra="onnx", what="the ONNX Runtime path (--no-onnx skips it)")
    if s.openvino or s.int8:
        require("onnx", extra="openvino", what="the OpenVINO paths (--no-openvino skips them)")
        require("openvino", extra="openvino", what="the OpenVINO paths (--no-openvino skips them)")
    if s.int8:
        require("nncf", extra="int8", what="the int8 path (--no-int8 skips it)")
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
    mask_preset = mask_preset_of(s.preset) if s.masks else None
    masked = None
    if mask_preset is not None:
        masked = Detector(mask_preset, **overrides)
        calibrate_cascade(masked.model, calibration, s.seed)  # the mask heads' calibration
        # Then the box model's own weights: both find the same boxes, and only the mask heads are the mask model's.
        missing, unexpected = masked.model.load_state_dict(fp32.model.state_dict(), strict=False)
        if unexpected or not all(name.startswith("mask_heads.") for name in missing):
            raise RuntimeError(f"{mask_preset} does not have {s.preset}'s box path")
        runners["torch_fp32_masks"] = masked.predict
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
    ir_paths = {}
    if s.openvino or s.int8:
        from cascade_rcnn.deploy.openvino import OpenVinoDetector, export_openvino
    if s.openvino:
        log("exporting to OpenVINO ...")
        ir_paths["openvino_fp32"] = export_openvino(fp32.model, work / "fp32.xml", config=fp32.config, preset=s.preset)
    if s.int8:
        from cascade_rcnn.deploy.quantize import quantize_openvino

        log("quantizing to int8 (OpenVINO + NNCF) ...")
        calibration_images = s.int8_calibration_images or [s.calibration_image]
        ir_paths["openvino_int8"] = quantize_openvino(
            fp32.model, calibration_images, work / "int8.xml", config=fp32.config, preset=s.preset
        )
    for name, ir_path in ir_paths.items():
        runners[name] = OpenVinoDetector(ir_path, threads=s.threads).predict
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
    names = list(runners)
    for i, (path, img) in enumerate(zip(s.images, images)):
        matmul_rates.append(matmul_gflops(s.threads, seconds=0.5))  # the CPU's rate now, as load varies
        # Each image starts with another path, so that no path always runs first (after the matmul, on cold caches)
        # or always right after the same neighbour.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            run = runners[name]
            start = time.perf_counter()
            with torch.inference_mode():
                out = run(img)
            times[name].append(time.perf_counter() - start)
            detections[name].append(len(out[0]["boxes"]) if isinstance(out, list) else len(out))
        log(f"  image {i + 1}/{len(images)} {path.name}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))

    # Batch of `batch` images with equal padded size (the Detector runs only those together), against the same images
    # one by one, measured back to back after one untimed batch (the one-by-one path is warm from the loop above: the
    # first batched call would otherwise pay for its larger maps' first allocation).
    transform = fp32.model.transform
    by_size: dict[tuple[int, int], list[Tensor]] = {}
    for img in images:
        h, w = transform.resized_size(*img.shape[-2:])
        by_size.setdefault((-(-h // 32), -(-w // 32)), []).append(img)
    group = max(by_size.values(), key=len)
    group = (group * s.batch)[: s.batch]
    with torch.inference_mode():
        fp32.predict(group, batch_size=s.batch)  # warm-up
        start = time.perf_counter()
        for img in group:
            fp32.predict(img)
        single = time.perf_counter() - start
        start = time.perf_counter()
        fp32.predict(group, batch_size=s.batch)
        batched = time.perf_counter() - start
    log(f"  batch of {s.batch}: {batched:.2f}s, one by one {single:.2f}s")

    paste_seconds = []
    if masked is not None:
        log("timing the paste of the masks ...")
        paste_seconds = [time_paste(masked.inference_model, img) for img in images]

    log("counting FLOPs ...")
    flops_by_size: dict[tuple[int, ...], int] = {}
    tv_flops_by_size: dict[tuple[int, ...], int] = {}
    mask_flops_by_size: dict[tuple[int, ...], int] = {}
    flops, tv_flops, mask_flops = [], [], []
    for img in images:
        key = tuple(img.shape)
        if key not in flops_by_size:
            with torch.inference_mode():
                flops_by_size[key] = count_flops(lambda img=img: fp32.predict(img))
                if tv is not None:
                    tv_flops_by_size[key] = count_flops(lambda img=img: tv([img / 255.0]))
                if masked is not None:
                    mask_flops_by_size[key] = count_flops(lambda img=img: masked.predict(img))
        flops.append(flops_by_size[key])
        if tv is not None:
            tv_flops.append(tv_flops_by_size[key])
        if masked is not None:
            mask_flops.append(mask_flops_by_size[key])
    matmul = statistics.median([*matmul_rates, matmul_gflops(s.threads, seconds=0.5)])

    log("measuring peak memory in fresh processes ...")
    weights = fp32.save(work / "weights.safetensors")
    if masked is None:
        measured = {"torch_fp32": _measure_peak_rss("torch_fp32", weights, s.images[0], s.threads)}
    else:
        # The same child for both: `Detector.from_weights` builds the mask model from its file. One model's peak
        # varies between fresh processes by as much as masks add (measured: 1247 and 1365 MB for one R50 file and
        # image), so each is measured `memory_runs` times (3), alternately, and the medians compared.
        mask_weights = masked.save(work / "mask_weights.safetensors")
        runs: dict[str, list[tuple[float, float]]] = {"torch_fp32": [], "torch_fp32_masks": []}
        for _ in range(s.memory_runs):
            for name, path in (("torch_fp32", weights), ("torch_fp32_masks", mask_weights)):
                runs[name].append(_measure_peak_rss("torch_fp32", path, s.images[0], s.threads))
        measured = {name: sorted(r)[len(r) // 2] for name, r in runs.items()}  # the median peak's run
        rss_runs = {name: [peak for peak, _ in r] for name, r in runs.items()}
    if tv is not None:
        tv_weights = save_torchvision_reference(tv, tv_settings, work / "torchvision.safetensors")
        measured["torchvision_faster_rcnn"] = _measure_peak_rss("torchvision", tv_weights, s.images[0], s.threads)
    for name, ir_path in ir_paths.items():
        measured[name] = _measure_peak_rss("openvino", ir_path, s.images[0], s.threads)
        # The same IR in the torch-free runtime (`LeanDetector`), as a deployment runs it: no torch in the process.
        call = f"lean_peak_rss({str(ir_path)!r}, {str(s.images[0])!r}, {s.threads})"
        measured[f"{name}_lean"] = peak_rss_in_child("cascade_rcnn.benchmarks.memory", call)
    tmp.cleanup()
    rss = {name: peak for name, (peak, _) in measured.items()}

    mean = {name: statistics.fmean(t) for name, t in times.items()}
    achieved = statistics.fmean(f / t for f, t in zip(flops, times["torch_fp32"])) / 1e9

    def ratio(a: str, b: str) -> float | None:
        return mean[a] / mean[b] if a in mean and b in mean else None

    def median_ratio(a: str, b: str) -> float | None:
        return statistics.median(times[a]) / statistics.median(times[b]) if a in times and b in times else None

    result = {
        "seconds_per_image": {name: mean.get(name) for name in PATHS},
        "median_seconds_per_image": {name: statistics.median(t) for name, t in times.items()},
        "ratio_vs_torchvision_fp32": ratio("torch_fp32", "torchvision_faster_rcnn"),
        "onnxruntime_speedup": ratio("torch_fp32", "onnxruntime"),
        "bf16_speedup": ratio("torch_fp32", "torch_bf16"),
        "openvino_fp32_speedup": ratio("torch_fp32", "openvino_fp32"),
        "int8_speedup": ratio("torch_fp32", "openvino_int8"),
        # The speed-ups of the medians too: on a shared CPU, one slow image moves a mean more than a median.
        "int8_speedup_median": median_ratio("torch_fp32", "openvino_int8"),
        "openvino_fp32_speedup_median": median_ratio("torch_fp32", "openvino_fp32"),
        # The deployment's figure: the int8 IR in the torch-free runtime; and in a process holding torch.
        "int8_peak_rss_mb": rss.get("openvino_int8_lean"),
        "int8_peak_rss_mb_with_torch": rss.get("openvino_int8"),
        f"batch{s.batch}_speedup": single / batched,  # one by one / batched time of the same `batch` images
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
        "cpu_isa": cpu_isa(),
    }
    # Per image, the mask model's time minus the box model's on the same image, timed side by side.
    mask_extra = [m - b for m, b in zip(times.get("torch_fp32_masks", []), times["torch_fp32"])]
    result.update({
        "mask_preset": mask_preset,
        "mask_extra_ms_per_image": 1e3 * statistics.fmean(mask_extra) if mask_extra else None,
        "mask_extra_ms_per_image_median": 1e3 * statistics.median(mask_extra) if mask_extra else None,
        "mask_time_ratio": ratio("torch_fp32_masks", "torch_fp32"),
        "mask_paste_ms_per_image": 1e3 * statistics.fmean(paste_seconds) if paste_seconds else None,
        "mask_gflops_per_image": (statistics.fmean(mask_flops) - statistics.fmean(flops)) / 1e9 if mask_flops else None,
        "mask_params": count_parameters(masked.model) - count_parameters(fp32.model) if masked is not None else None,
        "mask_peak_rss_extra_mb": rss["torch_fp32_masks"] - rss["torch_fp32"] if "torch_fp32_masks" in rss else None,
        "mask_peak_rss_runs_mb": rss_runs if masked is not None else None,
    })
    if tv is not None:
        result["torchvision_gflops_per_image"] = statistics.fmean(tv_flops) / 1e9
        result["torchvision_params"] = count_parameters(tv)
        result["torchvision_achieved_gflops"] = (
            statistics.fmean(f / t for f, t in zip(tv_flops, times["torchvision_faster_rcnn"])) / 1e9
        )
    return result


def time_paste(model: nn.Module, image: Tensor, repeats: int = 3) -> float:
    """Seconds `paste_masks` takes (best of `repeats`) to paste a mask model's detections on `image` into it: the
    model's own `detect` outputs, pasted as `CascadeRCNN.predict_batch` pastes them."""
    batch, _ = model.transform([image])
    with torch.inference_mode():
        boxes, _, _, _, probs = model.detect(*batch.as_tensors())
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            paste_masks(probs, boxes, batch.original_sizes[0], model.mask_threshold)
            best = min(best, time.perf_counter() - start)
    return best


def report(result: dict) -> str:
    """The benchmark's figures as a text table."""
    s, batch = result["settings"], result["batch_size"]
    secs, fp32 = result["seconds_per_image"], result["seconds_per_image"]["torch_fp32"]
    labels = {
        "torch_fp32": "ours, PyTorch fp32",
        "torch_fp32_masks": "ours + masks, PyTorch fp32",
        "torch_bf16": "ours, PyTorch bf16 autocast",
        "onnxruntime": "ours, ONNX Runtime",
        "openvino_fp32": "ours, OpenVINO fp32",
        "openvino_int8": "ours, OpenVINO int8 (NNCF)",
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
        f"OpenVINO fp32 speed-up over fp32:     {fmt(result['openvino_fp32_speedup'])}x  (target >= 1.2)",
        (
            f"int8 speed-up over fp32:              {fmt(result['int8_speedup'])}x  (target >= 3 with VNNI or AMX, "
            f">= 1.5 on AVX2; CPU: {', '.join(result['cpu_isa']) or 'no avx2'})"
        ),
        (
            f"int8 peak resident memory:            {fmt(result['int8_peak_rss_mb'], '.0f')} MB  (target <= 1000; "
            f"LeanDetector, no torch; {fmt(result.get('int8_peak_rss_mb_with_torch'), '.0f')} MB with OpenVinoDetector)"
        ),
        f"batch of {batch} vs one by one:      {fmt(result[f'batch{batch}_speedup'])}x  (target >= 1.2)",
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
    if result.get("mask_extra_ms_per_image") is not None:
        lines += [
            (
                f"masks ({result['mask_preset']}), per image:  {result['mask_extra_ms_per_image']:+.0f} ms "
                f"(median {result['mask_extra_ms_per_image_median']:+.0f} ms, {result['mask_time_ratio']:.2f}x the box "
                f"model), of which paste {result['mask_paste_ms_per_image']:.0f} ms; "
                f"+{result['mask_gflops_per_image']:.1f} GFLOP, +{result['mask_params'] / 1e6:.1f} M params"
            ),
            f"masks, peak resident memory:          {result['mask_peak_rss_extra_mb']:+.0f} MB  (target <= +300 MB)",
        ]
    if "runtime_rss_mb_by_path" in result:
        lines.append(
            "  of which the imports (Python + torch + torchvision; _lean: numpy + the runtime):  "
            + ", ".join(f"{k} {v:.0f} MB" for k, v in result["runtime_rss_mb_by_path"].items())
            + " (imported, before any model exists)"
        )
    return "\n".join(lines)
