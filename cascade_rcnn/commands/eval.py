"""`cascade-rcnn eval`: COCO box (and mask) metrics (pycocotools) of a results file, or of a model run over a COCO set.

Two modes:

- `--detections FILE --annotations JSON [--out DIR]`: score an existing COCO results file; no model is built.
- `--weights W --images DIR --annotations JSON [--out DIR] [--per-stage]`: run the model over every image of the
  annotation file, batch by batch, appending detections to `DIR/detections.json` as they come, so only one batch of
  images and outputs is in memory at a time; then score that file (pycocotools reads it back whole: a few small
  dicts per detection, at most 100 detections per image). `--per-stage` also scores each cascade stage's own output
  (`DIR/detections_stage{k}.json`, `DIR/metrics_stage{k}.json`) beside the ensemble, as the paper's ablation does.

`--tile SIZE` (sliced inference, for large images) and `--tta` (flip and scales) run the model through
`cascade_rcnn.inference`, box-only; `metrics.json` then also holds an `inference` record of which was used, its
settings and the model time per image (a plain run's `metrics.json` has exactly the 12 metrics).

Under `torchrun --nproc-per-node N -m cascade_rcnn eval --weights ... --out DIR` the images are shared out over the
N processes (`cascade_rcnn.inference.sharding`; `--out` on a folder they all see) and rank 0 scores the gathered
detections, the same files a single process writes; `--resume` goes on with a killed run.

Both print the 12 COCO metrics and the per-class AP, and with `--out` write `metrics.json`, `per_class_ap.json` and
the precision-recall curves (`pr_curves.png`, `pr_curves/pr_iou0.50.png` ...).

Masks: a mask model's `detections.json` holds each detection's `segmentation` (COCO compressed RLE); such a model,
or a `--detections` file whose entries carry `segmentation`, is scored twice, with box IoU ("bbox") and with mask IoU
("segm"), each table printed under its name; the segm files end in `_segm` (`metrics_segm.json`,
`per_class_ap_segm.json`, `pr_curves_segm.png` ...). Segm scoring needs an annotation file with a mask for every
object; without one (coco128's val file has boxes only) one line says why it is skipped, and the box metrics are
reported as usual.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from cascade_rcnn.commands import add_backend_argument, add_bf16_argument, backend_device, positive_int
from cascade_rcnn.commands.predict import (
    BATCH_HELP,
    coco_wh_plus_one,
    default_batch_size,
    load_for_backend,
    make_output_dir,
    model_has_masks,
    predict_batch,
    resolve_device,
)
from cascade_rcnn.data.dataset import is_file
from cascade_rcnn.data.image_io import load_image
from cascade_rcnn.errors import CascadeRCNNError, ConfigError, DatasetError, ImageReadError
from cascade_rcnn.evaluation.coco import (
    EvalResult,
    check_segm_ground_truth,
    detections_to_coco,
    evaluate_coco,
    has_segmentation_results,
    load_coco_gt,
    load_detections,
    map_labels_to_category_ids,
)
from cascade_rcnn.inference import options as inference_options
from cascade_rcnn.inference import resume, sharding
from cascade_rcnn.training.distributed import env_world_size

HELP = "COCO box (and mask) metrics of a detections file, or of a model run over a COCO-format image set."

_STAGE_TABLE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--detections", type=Path, metavar="FILE", help="COCO results JSON to score (no model needed)")
    source.add_argument(
        "--weights", metavar="W", help="weights file or known pretrained name: run the model over --images"
    )
    parser.add_argument("--annotations", required=True, type=Path, metavar="JSON", help="COCO-format annotation JSON")
    parser.add_argument(
        "--images", type=Path, metavar="DIR", help="folder holding the annotation file's images (with --weights)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write metrics.json, PR curves (and with --weights, detections.json) here",
    )
    parser.add_argument("--per-stage", action="store_true", help="also score each cascade stage's own output")
    parser.add_argument("--report", action="store_true",
                        help="also write report.html (with report.json and its plots) to --out: per-class AP, PR "
                        "curves, confusion matrix, TIDE errors, cascade stages, galleries of errors (with --images)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help=BATCH_HELP)
    parser.add_argument(
        "--device", metavar="DEVICE", help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)"
    )
    parser.add_argument("--preset", metavar="NAME", help="model preset (default: from the weights file's metadata)")
    add_bf16_argument(parser)
    add_backend_argument(parser)
    resume.add_arguments(parser)
    inference_options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.report and args.out is None:
        print("error: --report needs --out (the folder report.html is written to)", file=sys.stderr)
        return 2
    if args.report:
        from cascade_rcnn.evaluation.tide import require_tidecv

        require_tidecv()  # before the model runs
    if args.detections is not None:
        # --images is for the model; a report also draws its galleries from it.
        images = args.images is not None and not args.report
        model_only = [flag for flag, given in (("--images", images), ("--per-stage", args.per_stage),
                                               ("--preset", args.preset), ("--bf16", args.bf16),
                                               ("--tile", args.tile is not None), ("--tta", args.tta))
                      if given]  # fmt: skip
        if model_only:
            print(f"error: {', '.join(model_only)} only apply with --weights", file=sys.stderr)
            return 2
        if args.out is not None:
            make_output_dir(args.out)
        gt = load_coco_gt(args.annotations)
        detections = load_detections(args.detections)
        segm = has_segmentation_results(detections) and _segm_available(gt, args.annotations)
        results = [evaluate_coco(gt, detections, out_dir=args.out, iou_type=iou_type, source=str(args.detections))
                   for iou_type in (("bbox", "segm") if segm else ("bbox",))]  # fmt: skip
        print(format_results(results))
        if args.out is not None:
            print(f"\nmetrics and precision-recall curves written to {args.out}")
        if args.report:
            _write_report(args, gt, detections, results, str(args.detections))
        return 0
    if args.images is None:
        print("error: --weights needs --images (the folder of the annotation file's images)", file=sys.stderr)
        return 2
    # The report shows each stage's AP (not with tiling or TTA: their merge mixes the stages; not from an exported
    # graph, which returns the final detections only).
    args.per_stage = args.per_stage or (args.report and args.tile is None and not args.tta and args.backend == "torch")
    if args.out is not None:
        return _run_model(args, args.out)
    if env_world_size() > 1:
        print("error: eval under torchrun needs --out (a folder every process sees)", file=sys.stderr)
        return 2
    # Without --out the detections still stream to a file (so memory stays flat), in a folder removed afterwards.
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_eval_") as tmp:
        return _run_model(args, Path(tmp), write_extras=False)


def _run_model(args: argparse.Namespace, out_dir: Path, write_extras: bool = True) -> int:
    # torchrun's process group (nothing to join in one process) and this process's device.
    shards = sharding.join(resolve_device(backend_device(args)))
    gt = load_coco_gt(args.annotations)
    images = sorted(gt.dataset["images"], key=lambda image: image["id"])
    if not args.images.is_dir():
        raise DatasetError(f"{args.images}: images folder not found")
    unnamed = [f"image id {image['id']}: 'file_name' is {image.get('file_name')!r}, expected a non-empty string"
               for image in images
               if not isinstance(image.get("file_name"), str) or not image["file_name"]]  # fmt: skip
    if unnamed:
        raise DatasetError(f"{args.annotations}: images without a file name", unnamed)
    missing = [f"{args.images / image['file_name']} (image id {image['id']})" for image in images
               if not is_file(args.images / image["file_name"])]  # fmt: skip
    if missing:
        raise DatasetError(f"{len(missing)} images of {args.annotations} are not in {args.images}", missing)

    make_output_dir(out_dir)  # before the model loads: a bad --out fails at once
    tile, tta = inference_options.tile_config(args, args.batch_size), inference_options.tta_config(args)
    inference_options.check_backend(args, tile, tta)
    max_pixels = inference_options.max_pixels(args)
    # Tiling and TTA go image by image (`--batch-size`: slices or views per pass): one large image in memory at a time.
    augment = {"tile": tile, "tta": tta, "progress": True} if tile is not None or tta is not None else {}
    if args.per_stage and args.backend != "torch":
        raise ConfigError(f"--per-stage: the {args.backend} graph returns the final detections only; use the torch "
                          "backend for each stage's output")  # fmt: skip
    detector = load_for_backend(args, shards.device)
    inference_options.check_detector(detector, tile)
    batch_size = args.batch_size or default_batch_size(detector)
    images_per_pass = 1 if augment else batch_size
    category_ids, how = map_labels_to_category_ids(tuple(detector.class_names), gt)
    if shards.is_main:
        print(f"model labels -> annotation category ids: {how}", file=sys.stderr)
    # Decided before the model runs: a skipped segm evaluation is said at once, a malformed mask fails at once.
    masks = model_has_masks(detector) and not augment  # tiling and TTA are box-only
    segm = masks and shards.is_main and _segm_available(gt, args.annotations)

    plus_one = coco_wh_plus_one(detector)
    # Each image's detections (and with --per-stage each stage's, fields stage1, stage2 ...) are recorded as they come
    # and assembled into detections.json (detections_stage{k}.json) in image-id order at the end.
    with sharding.ImageRun(out_dir / "detections.json", [image["file_name"] for image in images], shards=shards,
                           command="eval", settings=resume.run_settings(args), resume=args.resume) as run:
        for chunk in run.chunks(images_per_pass):
            loaded: list[tuple[int, dict[str, Any], Any]] = []
            for index in chunk:
                image = images[index]
                try:
                    loaded.append((index, image, load_image(args.images / image["file_name"], max_pixels=max_pixels)))
                except ImageReadError as error:
                    run.write(f"skipped {error}")
                    run.counts["failed"] += 1
            if loaded:
                started = time.perf_counter()
                outputs = predict_batch(detector, [pixels for _, _, pixels in loaded], batch_size,
                                        return_stages=args.per_stage, **augment)  # fmt: skip
                run.counts["model_us"] += round((time.perf_counter() - started) * 1e6)
                for (index, image, _), det in zip(loaded, outputs, strict=True):
                    results = detections_to_coco(image["id"], det.boxes, det.scores, det.labels, category_ids,
                                                 wh_plus_one=plus_one, masks=det.masks if masks else None)  # fmt: skip
                    if args.per_stage and not det.stages:
                        raise CascadeRCNNError("--per-stage: the model returned no per-stage detections")
                    stages = {f"stage{k}": detections_to_coco(image["id"], stage.boxes, stage.scores, stage.labels,
                                                              category_ids, wh_plus_one=plus_one)
                              for k, stage in enumerate(det.stages if args.per_stage else [], start=1)}  # fmt: skip
                    run.add(index, results, **stages)

    failed, model_seconds = run.counts["failed"], run.counts["model_us"] / 1e6
    if not shards.is_main:
        return 0  # rank 0 scores the gathered detections and reports the run
    evaluated_ids = [images[index]["id"] for index in run.completed]
    stage_paths = [run.outputs[f"stage{k}"] for k in range(1, len(run.outputs))]  # outputs: results, stage1 ... stageK
    if failed:
        # Score only the images the model saw: counting unreadable images' objects as missed would understate AP.
        print(f"warning: {failed} images could not be read; metrics cover the other {len(evaluated_ids)}",
              file=sys.stderr)  # fmt: skip
    results = [evaluate_coco(gt, out_dir / "detections.json", out_dir=out_dir if write_extras else None,
                             image_ids=evaluated_ids, iou_type=iou_type)
               for iou_type in (("bbox", "segm") if segm else ("bbox",))]  # fmt: skip
    result = results[0]
    print(format_results(results))
    per_image = model_seconds / max(len(evaluated_ids), 1)
    print(f"model time: {per_image:.3f} s/image over {len(evaluated_ids)} images", file=sys.stderr)
    if augment:
        # Which of tiling / TTA made these numbers, in metrics.json beside them (a plain run's file keeps exactly the
        # 12 metrics).
        record = {**inference_options.describe(tile, tta), "seconds_per_image": round(per_image, 4)}
        print(f"inference: {json.dumps(record)}")
        if write_extras:
            metrics_path = out_dir / "metrics.json"
            metrics_path.write_text(json.dumps({**result.metrics, "inference": record}, indent=2) + "\n",
                                    encoding="utf-8")  # fmt: skip
    stage_results: list[tuple[str, EvalResult]] = []
    if args.per_stage:
        for k, stage_path in enumerate(stage_paths, start=1):
            stage_result = evaluate_coco(gt, stage_path, image_ids=evaluated_ids)
            if write_extras:
                stage_result.write_json(out_dir / f"metrics_stage{k}.json")
            stage_results.append((f"stage {k}", stage_result))
        print()
        print(format_stage_table([*stage_results, ("ensemble", result)]))
    if write_extras:
        print(f"\ndetections, metrics and precision-recall curves written to {out_dir}")
    if args.report:
        _write_report(args, gt, load_detections(out_dir / "detections.json"), results,
                      f"{out_dir / 'detections.json'} (model {args.weights})",
                      stage_results=stage_results, image_ids=evaluated_ids)  # fmt: skip
    return 1 if failed else 0


def _write_report(args: argparse.Namespace, gt: COCO, detections: list[dict[str, Any]], results: list[EvalResult],
                  source: str, **kwargs: Any) -> None:  # fmt: skip
    from cascade_rcnn.evaluation.report import write_report

    path = write_report(gt, detections, results, args.out, images_dir=args.images, annotations_name=str(
        args.annotations), detections_name=source, **kwargs)  # fmt: skip
    print(f"report written to {path}")


def _segm_available(gt: COCO, annotations: Path) -> bool:
    """Whether the annotation file can score masks; when not, says why on one line (the box metrics still follow)."""
    reason = check_segm_ground_truth(gt, str(annotations))
    if reason:
        print(f"segm evaluation skipped: {reason}; reporting bbox metrics only", file=sys.stderr)
    return reason is None


def format_results(results: list[EvalResult]) -> str:
    """The metrics table of one result as it is; several (bbox and segm) each under its IoU type's name."""
    if len(results) == 1:
        return results[0].format_table()
    return "\n\n".join(f"{result.iou_type}\n{result.format_table()}" for result in results)


def format_stage_table(rows: list[tuple[str, EvalResult]]) -> str:
    """AP of each cascade stage's own output next to the ensemble's, one row each."""
    lines = [f"{'output':<10}" + "".join(f"{name:>8}" for name in _STAGE_TABLE_METRICS)]
    for label, result in rows:
        cells = (result.metrics[name] for name in _STAGE_TABLE_METRICS)
        lines.append(f"{label:<10}" + "".join(f"{'-' if v < 0 else f'{v:.3f}':>8}" for v in cells))
    return "\n".join(lines)
