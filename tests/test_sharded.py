"""`torchrun --nproc-per-node 2 -m cascade_rcnn predict|eval ...` on the CPU (Gloo): the files two processes write are
byte for byte those of one process, an image that fails on either process is reported as one process reports it,
and rank 0 alone reports the run.

One process is run here with one intra-op thread, as torchrun gives each of its processes: a different thread count
changes the last bits of the floats (oneDNN's summation order), whatever the sharding.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_rcnn.cli import main
from cascade_rcnn.inference import resume
from tests.helpers import REPO, require_coco128

IMAGE_IDS = (139, 285, 632, 724, 776)


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "cascade_rcnn", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "cascade_rcnn", "predict", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0 and "--resume" in done.stdout


def test_two_gloo_processes_predict_the_bytes_of_one(tiny_weights: Path, tmp_path: Path, one_thread: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    images = require_coco128() / "val2017"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    # The broken file in the middle: whichever process claims it reports it.
    inputs = [str(images / f"{i:012d}.jpg") for i in IMAGE_IDS[:3]] + [str(broken)]
    inputs += [str(images / f"{i:012d}.jpg") for i in IMAGE_IDS[3:]]
    flags = ["--weights", str(tiny_weights), "--device", "cpu", "--score-thresh", "0.05"]

    assert main(["predict", *inputs, *flags, "--out", str(tmp_path / "one")]) == 1
    single = capsys.readouterr()
    group = torchrun(["predict", *inputs, *flags, "--out", str(tmp_path / "two")])

    assert group.returncode == 1, group.stderr[-3000:]
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert len(json.loads(one["detections.json"])) > 0
    assert one["detections.json"] == two["detections.json"]
    assert {k: v for k, v in one.items() if k.startswith("images/")} == {
        k: v for k, v in two.items() if k.startswith("images/")}  # fmt: skip
    assert len([k for k in one if k.startswith("images/")]) == len(IMAGE_IDS)
    # The failure, said once by the process that met it, and the summary once, by rank 0.
    message = f"skipped {broken}: cannot read image"
    assert single.err.count(message) == 1 and group.stderr.count(message) == 1
    assert single.out.replace("/one", "/two") == group.stdout
    assert group.stderr.count("1 input(s) failed") == 1
    # One progress bar, over all six inputs: every draw of it (tqdm redraws it below each skip message) counts up
    # towards 6/6; a second process's bar would start again from 0 or count to another total.
    draws = [(int(n), int(total)) for n, total in re.findall(r"predict: +\d+%\|[^|]*\| (\d+)/(\d+)", group.stderr)]
    assert draws and draws[-1] == (6, 6) and {total for _, total in draws} == {6}, draws
    assert [n for n, _ in draws] == sorted(n for n, _ in draws), draws
    # The broken image has no record: --resume would try it again.
    assert (tmp_path / "two" / resume.PARTIAL_DIR / "rank1.jsonl").is_file()


def test_two_gloo_processes_eval_per_stage_the_bytes_of_one(tiny_weights: Path, tmp_path: Path,
                                                            one_thread: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    coco128 = require_coco128()
    dataset = json.loads((coco128 / "annotations" / "instances_val2017.json").read_text())
    categories = [c for c in dataset["categories"] if c["name"] in ("person", "car", "dog")]
    kept = {c["id"] for c in categories}
    annotations = tmp_path / "five.json"
    annotations.write_text(json.dumps({
        "images": [image for image in dataset["images"] if image["id"] in IMAGE_IDS], "categories": categories,
        "annotations": [a for a in dataset["annotations"] if a["image_id"] in IMAGE_IDS and a["category_id"] in kept],
    }))  # fmt: skip
    flags = ["--weights", str(tiny_weights), "--images", str(coco128 / "val2017"), "--annotations", str(annotations),
             "--device", "cpu", "--per-stage"]  # fmt: skip

    assert main(["eval", *flags, "--out", str(tmp_path / "one")]) == 0
    single = capsys.readouterr()
    group = torchrun(["eval", *flags, "--out", str(tmp_path / "two")])

    assert group.returncode == 0, group.stderr[-3000:]
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    written = ["detections.json", *(f"detections_stage{k}.json" for k in (1, 2, 3))]
    for name in written:
        assert len(json.loads(one[name])) > 0 and one[name] == two[name], name
    for name in ("metrics.json", "metrics_stage1.json", "per_class_ap.json"):
        assert one[name] == two[name], name
    assert resume.PARTIAL_DIR not in {Path(name).parts[0] for name in two}  # removed: every image done
    assert single.out.replace("/one", "/two") == group.stdout  # the tables, printed once: by rank 0
