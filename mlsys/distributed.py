"""Beyond one process: torchrun, DistributedDataParallel, and shards of chunked work.

Three ways a stage uses more than one process, all with PyTorch's own engines:

* **Training** under ``torchrun`` (:func:`launch` starts it when
  ``distributed.nproc.train`` > 1): DistributedDataParallel with gloo on CPU and
  nccl on GPU, a :class:`~torch.utils.data.DistributedSampler` whose seeded shuffle
  is the single-process order, ``train.batch_size`` the GLOBAL batch (each of the W
  processes takes batch_size / W of it). Rank 0 alone logs and writes checkpoints.
* **Chunked work** (method one, method two, evaluation): the images are cut into
  fixed chunks; chunk j belongs to shard j mod n. Under torchrun, ranks compute
  their chunks and send them to rank 0 (:func:`run_chunks`), which stores them in
  the stage's :class:`ChunkStore`; independent processes given ``--shard i/n``
  store theirs in the same folder. Whoever then runs the stage unsharded finds every
  chunk done and merges them in chunk order: the same bytes as one process.
* **A dead peer** ends the stage: torchrun stops the other ranks when one fails,
  and every collective has a timeout (``distributed.timeout_s``), so nothing hangs.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from .files import atomic_path
from .progress import bar as progress_bar


# --------------------------------------------------------------------------- launching
def under_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (or another launcher
    that sets the torch.distributed environment)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def launch(nproc: int, relaunch: list[str]) -> None:
    """Re-run this command (the interpreter arguments ``relaunch``, ``-m <module> ...``) under
    ``torchrun --standalone --nproc-per-node nproc`` (this process is replaced) when
    ``nproc`` > 1 and it is not already a torchrun worker.
    Several machines: start torchrun yourself (docs/scale-out.md, "Several machines")."""
    if nproc <= 1 or under_torchrun():
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", *relaunch]
    print(f"mlsys: {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


@dataclass(frozen=True)
class Group:
    """This process's place in the torchrun job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main(group: Group | None) -> bool:
    """Whether this process is rank 0 of ``group`` (or the only process)."""
    return group is None or group.main


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float = 300.0) -> Iterator[Group | None]:
    """Join the torchrun job (gloo on CPU, nccl on CUDA; each rank on GPU LOCAL_RANK),
    or yield None when this is a single process. The group is left on exit."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield None
        return
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), local, device)
    finally:
        dist.destroy_process_group()


def broadcast(obj, group: Group | None):
    """``obj`` of rank 0, on every rank (pickled; keep it on the CPU)."""
    if group is None:
        return obj
    box = [obj if group.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Element-wise sum over the ranks of a CPU float64 tensor (exact for counts)."""
    if group is None:
        return values
    t = values.to(group.device)
    dist.all_reduce(t)
    return t.cpu()


# --------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the chunks j with j mod count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        from .params import ParamsError

        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            raise ParamsError(f"--shard {text!r} is invalid; expected i/n with 0 <= i < n, e.g. 0/4")
        return cls(i, n)

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class ChunkStore:
    """Finished chunks of one piece of work, one ``.npz`` each, in a folder stamped
    with the work's fingerprint (inputs and settings). A folder of other work is
    cleared; files are written whole (atomic rename), so a kill never leaves half a
    chunk, and an interrupted run resumes from what is there."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict) -> None:
        self.folder = Path(folder)
        self._text = json.dumps(fingerprint, sort_keys=True, default=str)
        self._stamp = self.folder / "fingerprint.json"
        if self.folder.exists():
            try:
                same = self._stamp.read_text() == self._text
            except OSError:
                same = False
            if not same:
                shutil.rmtree(self.folder)
        # the folder is made with the first finished chunk: a stage refused before that leaves nothing

    def path(self, chunk: int) -> Path:
        return self.folder / f"{chunk:06d}.npz"

    def load(self, chunk: int) -> dict[str, np.ndarray] | None:
        """A finished chunk, or None (an unreadable one is deleted: it is recomputed)."""
        path = self.path(chunk)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - truncated or foreign file
            path.unlink(missing_ok=True)
            return None

    def save(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        if not self._stamp.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._stamp) as tmp:
                tmp.write_text(self._text)
        with atomic_path(self.path(chunk)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def done(self) -> set[int]:
        return {int(p.stem) for p in self.folder.glob("[0-9]*.npz")}

    def merged(self, count: int) -> Iterator[dict[str, np.ndarray]]:
        """Chunks 0 .. count - 1 in order; every one must be done."""
        for j in range(count):
            part = self.load(j)
            if part is None:
                raise RuntimeError(f"chunk {j} vanished from {self.folder} while merging")
            yield part

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def chunk_sizes(n: int, size: int) -> list[int]:
    """Images in each chunk when ``n`` images are cut into chunks of ``size``."""
    return [min(size, n - start) for start in range(0, n, size)]


def run_chunks(chunks: Iterable[tuple[int, object]], compute: Callable[[object], dict[str, np.ndarray]],
               store: ChunkStore | None, shard: Shard, group: Group | None, sizes: list[int],
               desc: str, progress: bool = True) -> set[int]:
    """Compute the chunks of ``shard`` that ``store`` lacks and save them there; returns
    the chunks that were done before (rank 0; empty elsewhere).

    ``chunks`` yields (chunk number, input) in chunk order, the same on every rank.
    Under torchrun (``group``; ``store`` on rank 0 only) the missing chunks are dealt
    round-robin to the ranks and each round's results are gathered to rank 0, which
    saves them: no shared file system is needed. Rank 0 shows a progress bar in images
    (``sizes``: images per chunk)."""
    main = is_main(group)
    done = broadcast(store.done() if main else None, group)
    todo = ((j, x) for j, x in chunks if shard.owns(j) and j not in done)
    with progress_bar(sum(sizes[j] for j in range(len(sizes)) if shard.owns(j)),
                      desc if shard.count == 1 else f"{desc} shard {shard}", "img", progress and main) as bar:
        bar.update(sum(sizes[j] for j in done if shard.owns(j)))
        if group is None:
            for j, x in todo:
                store.save(j, compute(x))
                bar.update(sizes[j])
            return done
        while items := list(itertools.islice(todo, group.world)):  # every rank draws the same round
            mine = items[group.rank] if group.rank < len(items) else None
            rows = [None] * group.world if main else None
            dist.gather_object(None if mine is None else (mine[0], compute(mine[1])), rows, dst=0)
            for row in rows or ():
                if row is not None:
                    store.save(*row)
                    bar.update(sizes[row[0]])
    return done if main else set()


def in_processes(nproc: int, relaunch: list[str], device: torch.device, timeout_s: float,
                 work: Callable[["Group | None"], None]) -> None:
    """Run ``work(group)`` in this process, or, for ``nproc`` > 1, in each of the ``nproc``
    processes of a torchrun job that replaces this one (``relaunch``: the interpreter arguments
    of this command, re-run under torchrun); ``group`` is None in a single process."""
    launch(nproc, relaunch)
    with process_group(device, timeout_s) as group:
        work(group)
