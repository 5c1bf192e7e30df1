"""Training metrics: JSON lines (always) and TensorBoard (when installed), plus smoothing.

``metrics.jsonl`` is the record plots and reports read; each line is flushed as written so a
crashed run keeps everything up to its last log step. TensorBoard is optional, never required.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

from predet.checkpoint.atomic import atomic_write
from predet.config import SolverConfig, flatten
from predet.engine.distributed import all_reduce_mean
from predet.engine.optim import lr_at

METRICS_FILE = "metrics.jsonl"


class SmoothedValue:
    """A scalar series with median / mean over a recent window, for noisy per-step losses."""

    def __init__(self, window: int = 20):
        self._window: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self._window.append(float(value))
        self.total += float(value)
        self.count += 1

    @property
    def latest(self) -> float:
        return self._window[-1] if self._window else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self._window) if self._window else math.nan

    @property
    def avg(self) -> float:
        return sum(self._window) / len(self._window) if self._window else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan


def format_eta(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _finite_or_none(value):
    """NaN / inf as null, so metrics.jsonl stays strict JSON for any reader."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(record: dict) -> dict[str, float]:
    """Numeric leaves of a nested record as ``a/b`` keys, for TensorBoard scalars."""
    return {k: float(v) for k, v in flatten(record, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsWriter:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` (and TensorBoard).

    Disabled writers (non-main ranks) accept writes and do nothing, so callers need no rank
    checks. ``purge_step`` tells TensorBoard to drop events at or after it (a resumed run).
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if _tensorboard_available():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=purge_step)

    def write(self, record: dict) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(_finite_or_none(record)) + "\n")
        self._file.flush()
        if self._tb is not None and "iteration" in record:
            step = int(record["iteration"])
            for name, value in _scalars(record).items():
                if name not in ("iteration", "timestamp"):
                    self._tb.add_scalar(name, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, max_iteration: int) -> None:
    """Drop records after ``max_iteration`` so a resumed run does not log those steps twice.

    End-of-run records (``"final": true``) go too: the run being continued did not end there.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path)
            if int(r.get("iteration", 0)) <= max_iteration and not r.get("final")]
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept), mode="w")


class Meters:
    """Windowed losses, metrics and timings of this rank."""

    def __init__(self, window: int = 20):
        self.window = window
        self.losses: dict[str, SmoothedValue] = {}
        self.metrics: dict[str, SmoothedValue] = {}
        self.iter_time = SmoothedValue(window)
        self.data_time = SmoothedValue(window)
        self.images = SmoothedValue(window)

    def update(self, group: dict[str, SmoothedValue], values: dict[str, float]) -> None:
        for k, v in values.items():
            group.setdefault(k, SmoothedValue(self.window)).update(v)

    def localsummarize(self) -> dict[str, float]:
        out = {f"losses/{k}": m.median for k, m in self.losses.items()}
        out.update({f"metrics/{k}": m.median for k, m in self.metrics.items()})
        t = self.iter_time.avg if self.iter_time.count else math.nan
        out["time"] = t
        out["data_time"] = self.data_time.avg if self.data_time.count else math.nan
        out["images_per_s"] = self.images.avg / t if self.iter_time.count and t > 0 else math.nan
        return out


def summarize(meters: Meters, world_size: int) -> dict[str, Any]:
    """Smoothed values averaged over ranks (a collective: every rank must call it)."""
    flat = all_reduce_mean(meters.localsummarize())
    losses = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("losses/")}
    metrics = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("metrics/")}
    return {"losses": losses, "metrics": metrics, "time": flat["time"],
            "data_time": flat["data_time"], "images_per_s": flat["images_per_s"] * world_size}


def metrics_record(iteration: int, max_iters: int, solver: SolverConfig, summary: dict) -> dict:
    eta = summary["time"] * (max_iters - iteration) if math.isfinite(summary["time"]) else None
    return {
        "iteration": iteration,
        "lr": lr_at(max(iteration - 1, 0), solver),
        "losses": summary["losses"],
        "metrics": summary["metrics"],
        "images_per_s": summary["images_per_s"],
        "eta_s": eta,
        "time": summary["time"],
        "data_time": summary["data_time"],
        "timestamp": time.time(),
    }


def progress_postfix(meters: Meters, lr: float) -> dict[str, str]:
    post = {k.removeprefix("loss_") if k != "total_loss" else "loss": f"{m.median:.4g}"
            for k, m in meters.losses.items()}
    t = meters.iter_time.avg
    if meters.iter_time.count and t > 0:
        post["img/s"] = f"{meters.images.avg / t:.1f}"
    post["lr"] = f"{lr:.3g}"
    return post


def log_line(record: dict, max_iters: int) -> str:
    losses = "  ".join(f"{k} {v:.4g}" for k, v in record["losses"].items())
    return (f"iter {record['iteration']}/{max_iters}  {losses}  lr {record['lr']:.4g}  "
            f"{record['images_per_s']:.1f} img/s  eta {format_eta(record['eta_s'])}")
