"""One run of `predict` or `eval` over a list of images, in one process or sharded over the processes of a torchrun
group, resumable either way.

`torchrun --nproc-per-node N -m cascade_rcnn predict ...` starts N copies of the command; `join` puts each in the
process group torchrun describes (`training.distributed.init_distributed`: NCCL with one GPU per process,
`cuda:LOCAL_RANK`, or Gloo for CPU processes). `ImageRun` then shares out the images: the processes claim batches
from one counter in a store that rank 0 hosts (work stealing, so a slow image or a slow device holds up no one), each
writes its images' records to its own part file (`inference.resume`), and rank 0 assembles the results files from
all of them in input order once every process is done. Batches are claimed whole at the positions a single process
would run them, so every image is detected in the same company as in one process and the files are byte for byte
the ones a single process writes.

The output folder must be one that every process sees (on several nodes: a shared file system); `ImageRun` checks
this before any image is run. Rank 0 draws one progress bar over the whole set, fed from the store's counter.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from cascade_rcnn.errors import ConfigError
from cascade_rcnn.inference import resume as records
from cascade_rcnn.training.distributed import (
    DistInfo,
    any_flags,
    env_world_size,
    init_distributed,
    mean_over_processes,
    shutdown_distributed,
)

_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Shards:
    """This process's place in the run: its rank information and the device its model runs on."""

    info: DistInfo
    device: str

    @property
    def is_main(self) -> bool:
        return self.info.is_main


def join(device: str) -> Shards:
    """Join the process group of torchrun's environment (nothing to join in a single process) and pick this
    process's device: under torchrun, `cuda` becomes `cuda:LOCAL_RANK` (one GPU per process); another index is
    refused, as two processes on one GPU would only contend for it."""
    parsed = torch.device(device)
    if env_world_size() > 1 or (dist.is_available() and dist.is_initialized()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if parsed.type == "cuda":
            if parsed.index is not None and parsed.index != local_rank:
                raise ConfigError(f"--device {device}: under torchrun each process runs on cuda:LOCAL_RANK (here "
                                  f"cuda:{local_rank}); give --device cuda, and CUDA_VISIBLE_DEVICES to choose "
                                  "GPUs")  # fmt: skip
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"process {local_rank} of this node has no GPU: {torch.cuda.device_count()} "
                                  "visible; start at most that many processes per node")  # fmt: skip
            device = f"cuda:{local_rank}"
        return Shards(init_distributed(torch.device(device)), device)
    return Shards(DistInfo(), device)


class ImageRun:
    """The images of one command run, shared out over the processes, with per-image records for `--resume`.

    Use as a context manager around the command's loop:

        with ImageRun(out / "detections.json", keys, shards=shards, command="predict", settings=...,
                      resume=args.resume, desc="predict") as run:
            for chunk in run.chunks(batch_size):        # image indices into `keys`, this process's next batch
                ...
                run.add(index, results)                 # the image's COCO results dicts (and other lists)
                run.write("skipped ...")                # a line on stderr, above the progress bar
                run.counts["failed"] += 1               # summed over the processes on exit

    On a clean exit every process waits for the others, `counts` become the sums over all processes, and rank 0
    writes `results_path` (and `<stem>_<field>.json` for each other list field of the records) from the records, in
    input order; `outputs` then maps each field to its file and `completed` lists the indices with a record. After
    an error, a single process still assembles what it has (a readable partial file); the records stay in
    `OUT/partial` for `--resume` until a run leaves no image without a complete record.
    """

    def __init__(self, results_path: Path, keys: Sequence[str], *, shards: Shards, command: str,
                 settings: dict[str, Any], resume: bool = False, desc: str | None = None,
                 progress: bool = True) -> None:  # fmt: skip
        self.results_path = Path(results_path)
        self.folder = self.results_path.parent / records.PARTIAL_DIR
        self.keys = list(keys)
        self.shards = shards
        self.manifest = {"command": command, "settings": settings, "count": len(self.keys),
                         "inputs": records.inputs_digest(self.keys)}  # fmt: skip
        self.resume = resume
        self.desc = desc or command
        self.progress = progress
        self.counts: Counter[str] = Counter()
        self.outputs: dict[str, Path] = {}  # rank 0, after the block: record field -> results file
        self.written: dict[str, int] = {}  # rank 0, after the block: record field -> results in its file
        self.completed: list[int] = []
        self.resumed = 0  # images that already had a complete record
        self._todo: list[int] = []
        self._writer: records.RecordWriter | None = None
        self._store: Any = None
        self._master_store: Any = None
        self._bar: Any = None
        self._shown = 0
        self._bar_lock = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    @property
    def is_main(self) -> bool:
        return self.shards.is_main

    # --- set-up -------------------------------------------------------------------------------------------------------

    def __enter__(self) -> ImageRun:
        from tqdm import tqdm

        info = self.shards.info
        plan: dict[str, Any] = {}
        if info.is_main:
            try:
                plan = self._prepare()
            except ConfigError as error:
                plan = {"error": str(error)}
        if info.enabled:
            payload = [plan]
            dist.broadcast_object_list(payload, src=0)
            plan = payload[0]
        if "error" in plan:
            raise ConfigError(plan["error"])
        self._todo, self.resumed = plan["todo"], plan["resumed"]
        self._store = self._connect(plan.get("port"))
        self._writer = records.RecordWriter(records.part_path(self.folder, info.rank))
        if info.enabled:
            self._check_shared_folder(plan["run_id"])
        self._bar = tqdm(total=len(self.keys), initial=self.resumed, unit="img", desc=self.desc, file=sys.stderr,
                         disable=not (info.is_main and self.progress))  # fmt: skip
        if info.enabled and info.is_main and self.progress:
            self._follower = threading.Thread(target=self._follow, args=(plan["port"],), daemon=True)
            self._follower.start()
        return self

    def _prepare(self) -> dict[str, Any]:
        """Rank 0: the records folder made ready (`records.prepare`), the images left to run, and the store."""
        manifest = self.folder / records.MANIFEST_NAME
        resuming = self.resume and manifest.is_file()
        if self.resume and not resuming:
            print(f"--resume: no interrupted run in {self.results_path.parent} (no {manifest}); starting from the "
                  "first image", file=sys.stderr)  # fmt: skip
        elif not self.resume:
            self.results_path.unlink(missing_ok=True)  # a killed fresh run must not leave an older complete file
        run_id = uuid.uuid4().hex
        refs = records.prepare(self.folder, {**self.manifest, "run_id": run_id}, self.resume)
        done = {index for index, ref in refs.items() if ref.complete}
        if resuming:
            shared = f"; {self.shards.info.world_size} processes share the rest" if self.shards.info.enabled else ""
            print(f"resuming: {len(done)} of {len(self.keys)} images already done{shared}", file=sys.stderr)
        plan: dict[str, Any] = {"todo": [i for i in range(len(self.keys)) if i not in done], "resumed": len(done),
                                "run_id": run_id}  # fmt: skip
        if self.shards.info.enabled:
            # Port 0: the system picks a free one; the others learn it from the broadcast.
            self._master_store = dist.TCPStore(_master_address(), 0, is_master=True, wait_for_workers=False)
            plan["port"] = self._master_store.port
        return plan

    def _connect(self, port: int | None) -> Any:
        if port is None:
            return dist.HashStore()
        if self.shards.is_main:
            return self._master_store
        return dist.TCPStore(_master_address(), port, is_master=False)

    def _check_shared_folder(self, run_id: str) -> None:
        """Every process must see the folder rank 0 prepared: the manifest it wrote, with this run's id."""
        try:
            seen = json.loads((self.folder / records.MANIFEST_NAME).read_text(encoding="utf-8"))["run_id"]
        except (OSError, ValueError, KeyError):
            seen = None
        lost = any_flags([seen != run_id], self.shards.info, torch.device(self.shards.device))[0]
        if lost:
            raise ConfigError(f"--out {self.results_path.parent}: not the same folder for every process (process "
                              f"{self.shards.info.rank} {'does not see' if seen != run_id else 'sees'} rank 0's "
                              f"{self.folder / records.MANIFEST_NAME}); on several nodes, write to a shared file "
                              "system")  # fmt: skip

    # --- the loop -----------------------------------------------------------------------------------------------------

    def chunks(self, size: int) -> Iterator[list[int]]:
        """This process's batches of image indices, each claimed from the shared counter when the previous one is
        done (its records made durable first). Positions are multiples of `size` in the list of images left, as in
        a single process."""
        while True:
            end = int(self._store.add("claimed", size))
            start = end - size
            if start >= len(self._todo):
                return
            chunk = self._todo[start:end]
            yield chunk
            assert self._writer is not None
            self._writer.sync()
            self._store.add("done", len(chunk))
            if not self.shards.info.enabled:
                self._refresh(self._store)

    def add(self, index: int, results: list[dict[str, Any]], complete: bool = True, **fields: Any) -> None:
        """Record image `index`: its COCO results dicts (and other lists of them, e.g. `stage1=[...]`); `complete`
        False when a file written for it failed (kept, and run again by `--resume`)."""
        assert self._writer is not None, "ImageRun.add outside its with block"
        self._writer.add({"index": index, "complete": complete, "results": results, **fields})

    def write(self, message: str) -> None:
        """One line on stderr, above the progress bar."""
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    def _refresh(self, store: Any) -> None:
        done = int(store.add("done", 0))
        with self._bar_lock:
            if self._bar is not None and done > self._shown:
                self._bar.update(done - self._shown)
                self._shown = done

    def _follow(self, port: int) -> None:
        """Rank 0's progress bar over every process's images, on its own connection to the store."""
        store = dist.TCPStore(_master_address(), port, is_master=False)
        while not self._stop.wait(_POLL_SECONDS):
            self._refresh(store)

    # --- the end ------------------------------------------------------------------------------------------------------

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        info = self.shards.info
        try:
            if self._writer is not None:
                self._writer.close()
            if exc_type is not None:
                if not info.enabled:
                    self._assemble(partial=True)
                return
            self._store.add("finished", 1)
            if info.is_main:
                while int(self._store.add("finished", 0)) < info.world_size:
                    time.sleep(_POLL_SECONDS)
                self._stop.set()
                if self._follower is not None:
                    self._follower.join()
                self._refresh(self._store)
            if self._bar is not None:
                self._bar.close()
            keys = sorted(self.counts)
            if info.enabled:
                # Same keys on every process: the sums of a collective need them.
                names = [None] * info.world_size
                dist.all_gather_object(names, keys)
                keys = sorted({key for part in names for key in part})
                sums = mean_over_processes({key: float(self.counts[key]) for key in keys}, info,
                                           torch.device(self.shards.device))  # fmt: skip
                self.counts = Counter({key: round(value * info.world_size) for key, value in sums.items()})
            if info.is_main:
                self._assemble(partial=False)
        finally:
            self._stop.set()
            if self._bar is not None:
                self._bar.close()
            if exc_type is None:
                shutdown_distributed(info)

    def _assemble(self, partial: bool) -> None:
        """Rank 0: the results files from every process's records; `partial/` removed when nothing is left to do."""
        try:
            refs = records.scan_records(self.folder, count=len(self.keys))
            fields = records.result_fields(refs) or ["results"]
            for field in fields:
                path = records.output_path(self.results_path, field)
                self.written[field] = records.assemble(path, refs, len(self.keys), field)
                self.outputs[field] = path
            self.completed = sorted(refs)
            if not partial and len(refs) == len(self.keys) and all(ref.complete for ref in refs.values()):
                shutil.rmtree(self.folder, ignore_errors=True)
        except OSError as error:
            if not partial:
                raise
            self.write(f"could not write the partial results ({error})")


def _master_address() -> str:
    return os.environ.get("MASTER_ADDR", "127.0.0.1")
