"""``log.txt`` in every run folder: the run's console log, readable after the terminal is gone.

Log records go to the file as the console shows them; progress bars do not (tqdm writes to
the terminal, not through logging), so the file has no carriage-return noise. When the
process's stderr already goes into that file (a sweep captures each run's output into its
``log.txt``), nothing is added, so no line appears twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

LOG_NAME = "log.txt"
FORMAT = "%(asctime)s %(name)s: %(message)s"


def _stderr_is(path: Path) -> bool:
    """Whether this process's stderr is already written into ``path``."""
    try:
        return path.exists() and os.path.samestat(os.fstat(sys.stderr.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):  # stderr replaced by an object without a file
        return False


@contextlib.contextmanager
def run_log(run_dir, rank: int | None = None):
    """Append this process's INFO+ log records to ``run_dir/log.txt`` while the block runs
    (main process only: other ranks would interleave the same lines)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    path = Path(run_dir) / LOG_NAME
    if rank != 0 or _stderr_is(path):
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    old_level = root.level
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)  # a library caller without logging set up still gets a file
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
