"""Per-image records of a run over an image set, kept as JSON lines so that a killed run can be resumed.

A run of `predict` or `eval` writes one record per image to `OUT/partial/rank{r}.jsonl` (one file per process of a
sharded run), appended and made durable (flush + fsync) after every batch:

    {"index": 7, "complete": true, "results": [{...COCO results dict...}, ...], "stage1": [...], ...}

`index` is the image's position in the run's input list; `results` its COCO results dicts exactly as they go into
`detections.json` (`segmentation` RLEs included); any other list field `name` goes into `<stem>_<name>.json` beside
it (eval's `detections_stage1.json` ...). `complete` is false when the image's detections are known but a file the
command writes for it (the drawn picture) failed: its detections are kept, and `--resume` tries it again.

`OUT/partial/run.json` (the manifest) holds the settings that shape the output and a digest of the input list, so
`--resume` refuses to mix runs. A kill can tear only the last line of a part file; it is cut off on resume. The
results files are assembled from the records at the end, in input order, into a temporary file that then replaces
the old one: a results file is whole or absent, never half-written. `partial/` is removed once every image has a
complete record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade_rcnn.errors import ConfigError
from cascade_rcnn.evaluation.coco import CocoResultsWriter

PARTIAL_DIR = "partial"
MANIFEST_NAME = "run.json"
RESUME_HELP = (
    "go on with an interrupted run into the same --out: only the images without a result in OUT/partial are "
    "processed (same inputs and flags required); without it, a run starts again from the first image"
)
# Flags that do not change what is written: they may differ between a run and its resumption.
_NEUTRAL_SETTINGS = frozenset({"inputs", "out", "resume", "device", "batch_size", "command", "_run"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)


def part_path(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.jsonl"


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that shape a run's output (every flag but inputs, --out, --resume, --device, --batch-size), JSON
    values: what the manifest records and `--resume` compares."""
    return {name: json.loads(json.dumps(value, default=str)) for name, value in sorted(vars(args).items())
            if name not in _NEUTRAL_SETTINGS}  # fmt: skip


def inputs_digest(keys: Sequence[str]) -> str:
    """sha256 of the run's input list (one key per image, in order)."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class RecordRef:
    """Where one record lies: its part file and the byte range of its line (without the newline)."""

    path: Path
    offset: int
    length: int
    complete: bool
    fields: tuple[str, ...]  # its list fields: `results`, `stage1` ...


class RecordWriter:
    """Appends records to one part file. `sync()` makes everything written so far durable (flush + fsync); a record
    is one `write` of one line, so a kill leaves at most the last line torn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab")

    def add(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n")

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


def prepare(folder: Path, manifest: dict[str, Any], resume: bool) -> dict[int, RecordRef]:
    """Get `folder` ready for a run described by `manifest` ({"settings": ..., "inputs": digest, "count": N, ...}).

    Fresh (`resume` False): the folder is emptied. Resumed: the manifest must match the folder's own (else a
    `ConfigError` naming the flag or the inputs that differ); torn last lines are cut off. Returns the records
    already there by image index (none when fresh, or when there is nothing to resume)."""
    path = folder / MANIFEST_NAME
    if resume and path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"--resume: cannot read {path} ({error}); run without --resume to start again") from None
        _check_same_run(previous, manifest, folder)
        refs = scan_records(folder, count=manifest["count"])
    else:
        if folder.exists():
            shutil.rmtree(folder)
        refs = {}
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return refs


def _check_same_run(previous: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    again = "run without --resume to start again, or resume with the same inputs and flags"
    if previous.get("command") != current.get("command"):
        raise ConfigError(f"--resume: {folder} holds a run of {previous.get('command')!r}, not "
                          f"{current.get('command')!r}; {again}")  # fmt: skip
    old, new = previous.get("settings", {}), current.get("settings", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"--resume: the interrupted run in {folder.parent} had {flag} {old.get(name)!r}, this "
                              f"one {new.get(name)!r}; {again}")  # fmt: skip
    if previous.get("inputs") != current.get("inputs"):
        raise ConfigError(f"--resume: the inputs differ from the interrupted run's in {folder.parent} "
                          f"({previous.get('count')} images then, {current.get('count')} now); {again}")  # fmt: skip


def scan_records(folder: Path, count: int) -> dict[int, RecordRef]:
    """The records in `folder`'s part files by image index (indices outside 0..count-1 are ignored). A complete
    record wins over an incomplete one of the same image. A torn last line (no newline: the process was killed while
    writing it) is cut off its file, so the next append starts a fresh line."""
    refs: dict[int, RecordRef] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with path.open("r+b") as file:
                file.truncate(end)
        offset = 0
        for line in data[:end].split(b"\n")[:-1]:
            try:
                record = json.loads(line)
                index, complete = int(record["index"]), bool(record.get("complete", True))
                fields = tuple(name for name, value in record.items() if isinstance(value, list))
            except (ValueError, KeyError, TypeError):
                index = -1  # a damaged line (not from a kill: those only tear the last one); its image is redone
            if 0 <= index < count and (index not in refs or (complete and not refs[index].complete)):
                refs[index] = RecordRef(path, offset, len(line), complete, fields)
            offset += len(line) + 1
    return refs


def read_record(ref: RecordRef) -> dict[str, Any]:
    with ref.path.open("rb") as file:
        file.seek(ref.offset)
        return json.loads(file.read(ref.length))


def result_fields(refs: dict[int, RecordRef]) -> list[str]:
    """The list fields of the records (`results` first, then the others by name): one results file each."""
    fields = {name for ref in refs.values() for name in ref.fields}
    return sorted(fields, key=lambda name: (name != "results", name))


def output_path(path: Path, field: str) -> Path:
    """The results file of a record field: `path` for `results`, `<stem>_<field>.json` beside it otherwise."""
    return path if field == "results" else path.with_name(f"{path.stem}_{field}{path.suffix}")


def assemble(path: Path, refs: dict[int, RecordRef], count: int, field: str = "results") -> int:
    """Write the COCO results file `path` from the `field` lists of the records of images 0..count-1, in that order,
    with `CocoResultsWriter`, so the bytes are those a one-pass run writes; into a temporary file that then replaces
    `path`. Returns the number of results written."""
    temporary = path.with_name(f".{path.name}.tmp")
    with CocoResultsWriter(temporary, category_ids=[]) as writer:
        for index in range(count):
            if index in refs:
                writer.add_results(read_record(refs[index]).get(field, []))
    os.replace(temporary, path)
    return writer.count


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
