"""What a run could not read, over all ranks: unreadable images (counted against the reads, to
judge their fraction) and damaged shards (against their data set's shards). Listed in
``skipped.jsonl``, kept in checkpoints, and the run stops past ``train.max_skipped_fraction``."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path

from predet.checkpoint.atomic import atomic_write
from predet.engine.distributed import (
    all_gather_object,
    all_reduce_sum_ints,
    is_main_process,
)
from predet.errors import DataError

# The skipped-image fraction is judged once this many images were read (or at the end).
MIN_READS_TO_JUDGE = 100


def write_skipped(run_dir: Path, skipped: dict[str, str]) -> None:
    """``skipped.jsonl`` when there is something to list (or an older list to bring up to date)."""
    if is_main_process() and (skipped or (run_dir / "skipped.jsonl").exists()):
        atomic_write(run_dir / "skipped.jsonl", lambda f: f.writelines(
            json.dumps({"path": p, "reason": r}) + "\n" for p, r in skipped.items()), mode="w")


class SkipLedger:
    """What could not be read, over all ranks: unreadable images (with the image reads, to
    judge their fraction) and damaged shards (against the shards of their data set).

    ``pending`` holds this rank's entries until a collective merges them into ``skipped``
    (path -> reason), the list ``skipped.jsonl`` and the checkpoints keep."""

    def __init__(self, run_dir: Path, limit: float, state: Mapping | None = None):
        state = state or {}
        self.run_dir, self.limit = run_dir, limit
        self.skipped = {str(p): str(r) for p, r in state.get("skipped", [])}
        self.reads = [int(v) for v in state.get("image_reads", [0, 0])]  # image reads, failed
        self.damaged = {str(p): int(n) for p, n in state.get("damaged_shards", [])}  # url -> shards
        self.pending: list[list] = []  # [path, reason, shards of its set (0 for an image)]

    def state(self) -> dict:
        return {"skipped": [[p, r] for p, r in self.skipped.items()], "image_reads": list(self.reads),
                "damaged_shards": [[p, n] for p, n in self.damaged.items()]}

    def count(self, num_images: int, images: list, shards: list) -> int:
        """One step's reads, summed over ranks (a collective: every rank calls it every step);
        stops the run past the limits. Returns the number of ranks whose batch was empty."""
        self.pending += [[p, r, 0] for p, r in images] + [[p, r, int(n)] for p, r, n in shards]
        empties, step_reads, step_failed, step_shards = all_reduce_sum_ints(
            [num_images == 0, num_images + len(images), len(images), len(shards)])
        self.reads[0] += step_reads
        self.reads[1] += step_failed
        if step_shards:
            self.merge()
            self.check_shards()
        self.check_images(final=False)
        return empties

    def merge(self) -> None:
        """Collective: every rank's pending entries into ``skipped`` on every rank."""
        for part in all_gather_object(self.pending):
            for path, reason, shards in part:
                self.skipped.setdefault(path, reason)
                if shards:
                    self.damaged[path] = shards
        self.pending = []

    def write(self) -> None:
        write_skipped(self.run_dir, self.skipped)

    def examples(self, n: int = 3) -> str:
        shown = "; ".join(f"{p} ({r[:80]})" for p, r in itertools.islice(self.skipped.items(), n))
        return shown + (f"; ... {len(self.skipped) - n} more" if len(self.skipped) > n else "")

    def check_images(self, final: bool) -> None:
        """Stop when more than ``limit`` of the image reads failed (judged once enough were read;
        ``reads`` are summed over ranks, so every rank judges alike)."""
        reads, failed = self.reads
        if reads == 0 or (reads < MIN_READS_TO_JUDGE and not final) or failed <= self.limit * reads:
            return
        self.merge()
        self.write()
        raise DataError(
            f"{failed} of {reads} image reads failed ({failed / reads:.0%}, more than "
            f"train.max_skipped_fraction={self.limit:g}): {self.num_images} unreadable image(s), e.g. "
            f"{self.examples()}. Fix the image paths/files (list in "
            f"{self.run_dir / 'skipped.jsonl'}) or raise train.max_skipped_fraction")

    def check_shards(self) -> None:
        """Stop when more than ``limit`` of the data set's shards turned out damaged."""
        total = max(self.damaged.values(), default=0)
        if not self.damaged or len(self.damaged) <= self.limit * total:
            return
        self.write()
        shown = "; ".join(f"{p} ({self.skipped[p][:80]})" for p in itertools.islice(self.damaged, 3))
        raise DataError(
            f"{len(self.damaged)} of {total} shards are damaged (more than "
            f"train.max_skipped_fraction={self.limit:g} of them), e.g. {shown}. Rewrite or replace "
            f"them (list in {self.run_dir / 'skipped.jsonl'}) or raise train.max_skipped_fraction")

    @property
    def num_images(self) -> int:
        return len(self.skipped) - len(self.damaged)
