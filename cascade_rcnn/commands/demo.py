"""`cascade-rcnn demo`: the whole job on a fresh machine, with no downloads, on the CPU.

1. Generate the synthetic shapes dataset (`cascade_rcnn.data.synthetic`: 4 classes, PNG + COCO JSON).
2. Train a small configuration from scratch (`demo_experiment`): the R-50-FPN preset with narrow bottlenecks, a
   64-channel FPN, 256-wide box heads and 16 px anchors, set through existing config fields only.
3. Evaluate the saved weights on the val split with pycocotools and print the COCO table.
4. Draw the predictions.

`--masks` trains Cascade Mask R-CNN instead (`cascade_mask_rcnn_r50_fpn`, mmdetection's three mask heads, made light
the same way: 64-channel mask convs) on the shapes' exact masks, and scores masks too (`metrics_segm.json`, the
pictures with their masks).

`--out DIR` receives:

    model.safetensors          the trained weights (loadable by `predict`, `eval` and `Detector.from_weights`)
    metrics.json               the 12 COCO metrics, as `eval` writes them (with per_class_ap.json, pr_curves*)
    detections.json            the val detections (COCO results format)
    data/{train,val}/*.png, data/{train,val}.json   the synthetic set and its COCO annotations
    predictions/*.png          val images with their detections drawn
    train/                     the training run: metrics.jsonl, config.json, recipe.json, checkpoints

`--data-only --layout coco|voc|yolo` writes only the synthetic set, in the folder layout of that annotation format
(`write_layout`), to try `data check` and `train` on a dataset shaped like one's own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HELP = "Generate a synthetic dataset, train a small detector on the CPU, evaluate it and draw its predictions."

# The demo's model: the R-50-FPN preset made light through existing fields. Objects are 16-96 px on 256 px images, so
# anchors start at 16 px (scale 4 x stride 4) and the RoI levels map them to P2-P3.
DEMO_MODEL: dict[str, Any] = {
    "transform": {"min_size": 256, "max_size": 256},
    "backbone": {"width_per_group": 16},  # bottleneck widths 16..128 instead of 64..512
    "fpn": {"out_channels": 64},
    "anchors": {"scales": [4.0]},
    "rpn": {"pre_nms_top_n_train": 1000, "post_nms_top_n_train": 300,
            "pre_nms_top_n_test": 500, "post_nms_top_n_test": 100},  # fmt: skip
    "roi_align": {"sampling_ratio": 2},
    "cascade": {"fc_dim": 256, "batch_size_per_image": 128},
}
DEMO_MASKS: dict[str, Any] = {"conv_dim": 64}  # --masks: the mask heads' convs as narrow as the FPN
DEMO_TRAIN: dict[str, Any] = {
    "schedule": "custom",
    "scale_lr": False,
    "lr": 0.02,
    "batch_size": 4,
    "warmup_iters": 50,
    "clip_grad_norm": 10.0,
    "eval_interval": 0,
    "log_interval": 10,
    "keep_checkpoints": 1,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; reused files overwritten)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (6; the lr drops 10x for the last)")
    parser.add_argument("--num-train", type=int, default=200, help="synthetic training images (200)")
    parser.add_argument("--num-val", type=int, default=50, help="synthetic val images (50)")
    parser.add_argument("--max-iters", type=int, default=0, help="stop training after this many iterations")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training (0)")
    parser.add_argument("--draw", type=int, default=16, help="val images to draw predictions on (16)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo config key, as `train --set` (e.g. train.lr=0.01)")
    parser.add_argument("--masks", action="store_true",
                        help="train Cascade Mask R-CNN on the shapes' masks and score masks too")
    parser.add_argument("--data-only", action="store_true",
                        help="only write the synthetic dataset (in --layout) and print its folder tree")
    parser.add_argument("--layout", choices=("coco", "voc", "yolo"), default="coco",
                        help="folder layout of --data-only: COCO JSON, Pascal VOC XML or YOLO txt (coco)")


def demo_experiment(
    data: dict[str, Path], out: Path, epochs: int, seed: int, max_iters: int, masks: bool = False
) -> dict[str, Any]:
    """The demo's training config, as the mapping a config file would hold."""
    steps = [epochs - 1] if epochs > 1 else []  # lr x 0.1 for the last epoch
    return {
        "preset": "cascade_mask_rcnn_r50_fpn" if masks else "cascade_rcnn_r50_fpn",
        "model": {**DEMO_MODEL, "mask": DEMO_MASKS} if masks else DEMO_MODEL,
        "data": {
            "format": "coco",
            "train_images": str(data["train_images"]),
            "train_annotations": str(data["train_annotations"]),
            "num_workers": 0,
        },
        "train": {**DEMO_TRAIN, "epochs": epochs, "lr_steps": steps, "seed": seed, "max_iters": max_iters,
                  "output_dir": str(out / "train"), "device": "cpu"},  # fmt: skip
    }


def run(args: argparse.Namespace) -> int:
    from cascade_rcnn.data.synthetic import make_shapes_dataset
    from cascade_rcnn.training.config import apply_overrides, experiment_from_dict, parse_override
    from cascade_rcnn.training.trainer import Trainer

    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.data_only:
        files = write_layout(out, args.layout, args.num_train, args.num_val, args.seed)
        print(f"wrote the synthetic shapes set ({args.num_train} train + {args.num_val} val images, 4 classes) in the "
              f"{args.layout} layout:")  # fmt: skip
        print(folder_tree(out, files))
        return 0
    print(f"[1/4] generating {args.num_train} + {args.num_val} synthetic images in {out / 'data'}", flush=True)
    data = make_shapes_dataset(out / "data", num_train=args.num_train, num_val=args.num_val, seed=args.seed)

    raw = demo_experiment(data, out, args.epochs, args.seed, args.max_iters, args.masks)
    raw = apply_overrides(raw, dict(parse_override(item) for item in args.set))
    exp = experiment_from_dict(raw)
    train_dir = out / "train"
    if train_dir.exists():
        shutil.rmtree(train_dir)  # a fresh run: an old run's checkpoints and metrics would be mixed in
    print(f"[2/4] training on the CPU ({time.perf_counter() - start:.0f} s)", flush=True)
    result = Trainer(exp).train()
    weights = out / "model.safetensors"
    shutil.copyfile(result.final_weights, weights)  # type: ignore[arg-type]

    print(f"[3/4] evaluating {weights} on {args.num_val} val images ({time.perf_counter() - start:.0f} s)", flush=True)
    metrics = evaluate_and_draw(weights, data, out, args.draw)
    elapsed = time.perf_counter() - start
    scores = f"AP50 {metrics['bbox']['AP50']:.3f}, AP {metrics['bbox']['AP']:.3f}"
    if "segm" in metrics:
        scores = f"box {scores}; mask AP50 {metrics['segm']['AP50']:.3f}, AP {metrics['segm']['AP']:.3f}"
    print(f"\n{scores}; wall time {elapsed:.0f} s")
    print(f"weights {weights}; metrics {out / 'metrics.json'}; pictures {out / 'predictions'}")
    summary = {"AP50": metrics["bbox"]["AP50"], "AP": metrics["bbox"]["AP"], "wall_time_s": round(elapsed, 1),
               "iterations": result.iterations, "epochs": args.epochs}  # fmt: skip
    if "segm" in metrics:
        summary.update(mask_AP50=metrics["segm"]["AP50"], mask_AP=metrics["segm"]["AP"])
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def evaluate_and_draw(weights: Path, data: dict[str, Path], out: Path, draw: int) -> dict[str, dict[str, float]]:
    """Run the saved weights over the val split (through the public `Detector`), score them, draw some. Returns the
    COCO metrics by kind: "bbox", and "segm" for a mask model."""
    from PIL import Image

    from cascade_rcnn.api import Detector
    from cascade_rcnn.data.image_io import load_image
    from cascade_rcnn.evaluation.coco import CocoResultsWriter, evaluate_coco, load_coco_gt, map_labels_to_category_ids
    from cascade_rcnn.evaluation.visualize import draw_detections

    detector = Detector.from_weights(weights)
    gt = load_coco_gt(data["val_annotations"])
    category_ids, _ = map_labels_to_category_ids(detector.class_names, gt)
    images = sorted(gt.dataset["images"], key=lambda image: image["id"])
    pictures = out / "predictions"
    pictures.mkdir(parents=True, exist_ok=True)
    with CocoResultsWriter(out / "detections.json", category_ids) as writer:
        for index in range(0, len(images), 4):
            batch = images[index : index + 4]
            pixels = [load_image(data["val_images"] / image["file_name"]) for image in batch]
            for offset, (image, array, det) in enumerate(zip(batch, pixels, detector.predict(pixels, batch_size=4))):
                writer.add(image["id"], det.boxes, det.scores, det.labels, masks=det.masks)
                if index + offset < draw:
                    drawn = draw_detections(Image.fromarray(array), det.boxes, det.scores, det.labels,
                                            detector.class_names, score_thresh=0.5, masks=det.masks)  # fmt: skip
                    drawn.save(pictures / image["file_name"])
    metrics = {}
    for kind in ("bbox", "segm") if detector.config.has_masks else ("bbox",):
        result = evaluate_coco(gt, out / "detections.json", out_dir=out, iou_type=kind)
        print(result.format_table())
        metrics[kind] = result.metrics
    sys.stdout.flush()
    return metrics


def write_layout(out: Path, layout: str, num_train: int, num_val: int, seed: int) -> list[Path]:
    """The synthetic set under `out` in the folder layout of `layout`; returns the files written.

        coco: train/*.png, val/*.png, train.json, val.json
        voc:  JPEGImages/{train,val}_NNNNNN.png, Annotations/{train,val}_NNNNNN.xml, ImageSets/Main/{train,val}.txt,
              names.txt (the class order; VOC files name their classes)
        yolo: images/{train,val}/NNNNNN.png, labels/{train,val}/NNNNNN.txt (class cx cy w h, normalised), names.txt
    """
    import tempfile

    from cascade_rcnn.data.synthetic import CLASS_NAMES, make_shapes_dataset

    if layout == "coco":
        paths = make_shapes_dataset(out, num_train=num_train, num_val=num_val, seed=seed)
        return sorted([*paths["train_images"].iterdir(), *paths["val_images"].iterdir(), paths["train_annotations"],
                       paths["val_annotations"]])  # fmt: skip
    files: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    names = out / "names.txt"
    names.write_text("".join(f"{name}\n" for name in CLASS_NAMES), encoding="utf-8")
    files.append(names)
    with tempfile.TemporaryDirectory(prefix="shapes_") as tmp:
        paths = make_shapes_dataset(tmp, num_train=num_train, num_val=num_val, seed=seed)
        for split in ("train", "val"):
            coco = json.loads(paths[f"{split}_annotations"].read_text(encoding="utf-8"))
            boxes: dict[int, list[tuple[int, list[float]]]] = {}
            for ann in coco["annotations"]:
                boxes.setdefault(ann["image_id"], []).append((ann["category_id"] - 1, ann["bbox"]))
            stems = []
            for image in coco["images"]:
                objects = boxes.get(image["id"], [])
                source = paths[f"{split}_images"] / image["file_name"]
                if layout == "voc":
                    stem = f"{split}_{Path(image['file_name']).stem}"
                    files.append(_copy(source, out / "JPEGImages" / f"{stem}.png"))
                    files.append(_write(out / "Annotations" / f"{stem}.xml",
                                        _voc_xml(f"{stem}.png", image, objects, CLASS_NAMES)))  # fmt: skip
                    stems.append(stem)
                else:
                    files.append(_copy(source, out / "images" / split / image["file_name"]))
                    w, h = image["width"], image["height"]
                    lines = [f"{c} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n"
                             for c, (x, y, bw, bh) in objects]  # fmt: skip
                    label_file = out / "labels" / split / f"{Path(image['file_name']).stem}.txt"
                    files.append(_write(label_file, "".join(lines)))
            if layout == "voc":
                files.append(_write(out / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{s}\n" for s in stems)))
    return sorted(files)


def _voc_xml(file_name: str, image: dict[str, Any], objects: list[tuple[int, list[float]]],
             class_names: tuple[str, ...]) -> str:  # fmt: skip
    # VOC boxes are 1-based inclusive pixel indices: a box over pixels x1 .. x2 - 1 is xmin = x1 + 1, xmax = x2.
    parts = [f"<annotation><filename>{file_name}</filename><size><width>{image['width']}</width><height>"
             f"{image['height']}</height><depth>3</depth></size>"]  # fmt: skip
    for label, (x, y, w, h) in objects:
        box = f"<xmin>{int(x) + 1}</xmin><ymin>{int(y) + 1}</ymin><xmax>{int(x + w)}</xmax><ymax>{int(y + h)}</ymax>"
        name = class_names[label]
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox>{box}</bndbox></object>")
    return "".join(parts) + "</annotation>\n"


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def folder_tree(root: Path, files: list[Path], shown: int = 2) -> str:
    """`root` as an indented tree of its folders, with the first `shown` files of each and a count of the rest."""
    children: dict[Path, set[Path]] = {}
    for path in files:
        node = path
        while node != root:
            children.setdefault(node.parent, set()).add(node)
            node = node.parent
    lines = [f"{root}/"]

    def walk(folder: Path, depth: int) -> None:
        entries = sorted(children.get(folder, ()))
        folders = [e for e in entries if e in children]
        leaves = [e for e in entries if e not in children]
        for sub in folders:
            lines.append(f"{'    ' * depth}{sub.name}/")
            walk(sub, depth + 1)
        lines.extend(f"{'    ' * depth}{leaf.name}" for leaf in leaves[:shown])
        if len(leaves) > shown:
            lines.append(f"{'    ' * depth}... ({len(leaves)} files)")

    walk(root, 1)
    return "\n".join(lines)
