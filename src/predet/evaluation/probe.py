"""The transfer probe: is the pre-training helping yet, while it runs?

The pretext signals rising is necessary, not sufficient: on FashionDet the pretext parts once
"learned" while the checkpoint fine-tuned worse than random weights. So every ``probe.period``
pre-training iterations the probe writes the current weights and fine-tunes a small detector
from them for a short, fixed budget (``probe.iters`` on ``probe.subset`` images of a fixed
box-labelled set), scored on a fixed subset of that set's val split (``probe.val_subset``): ``probe/bbox/AP`` in ``metrics.jsonl``
(and TensorBoard, and the pretext plot) at the iteration of the weights. The same budget from
random weights, run once, is the floor it must beat (``probe/bbox/AP_scratch``); there the whole
network trains (``predet finetune`` frees a frozen backbone that holds random weights), so the
floor is, if anything, generous to random weights.

A probe is an ordinary ``predet finetune`` run in its own process and folder
(``RUN/probe/iterNNNNNNN/``, ``RUN/probe/scratch/``), with its schedule's decays placed inside its
budget and a fixed seed, so it is deterministic for a checkpoint. It runs beside the
pre-training (``probe.background``, ``probe.threads`` CPU threads; the run waits only for the
last ones at its end) or in turn (the run waits for each), on ``probe.device`` (the CPU by
default: beside a GPU run it takes no GPU memory). Rank 0 runs the probes, each a single process
outside the run's process group; a probe dies with its run, and a resumed run logs what finished
meanwhile and restarts what did not.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from predet.checkpoint.io import save_checkpoint
from predet.config.base import ConfigError
from predet.config.finetune import load_finetune_config
from predet.config.pretrain import ProbeConfig
from predet.config.schedules import BASE_BATCH, ONE_X_ITERS
from predet.data.coco_json import fixed_val_subset
from predet.engine.metrics import METRICS_FILE, read_metrics
from predet.engine.processes import die_with_parent, standalone_env
from predet.errors import InputNotFound

logger = logging.getLogger(__name__)

METRICS = ("bbox/AP", "segm/AP")
FLOOR = "scratch"  # the floor's folder and record name
SCRATCH_INIT = "scratch"  # what ``init=`` takes for random weights


def check_probe_config(cfg: ProbeConfig) -> None:
    """What would make every probe fail, refused before the pre-training starts."""
    if not cfg.val:
        raise ConfigError("probe.data is set but probe.val is empty: give the COCO json the probe is scored on")
    for key in ("data", "val"):
        if not Path(getattr(cfg, key)).is_file():
            raise InputNotFound(f"probe.{key}={getattr(cfg, key)}: no such file")
    for key in ("images", "val_images"):
        if getattr(cfg, key) and not Path(getattr(cfg, key)).is_dir():
            raise InputNotFound(f"probe.{key}={getattr(cfg, key)}: no such folder")
    load_finetune_config(cfg.config, list(cfg.overrides))  # a bad probe.config or override: one line now


def probe_schedule_scale(cfg: ProbeConfig) -> float:
    """``schedule_scale`` that makes the probe config's 1x schedule ``cfg.iters`` iterations at
    its batch, decays (2/3, 8/9) and warm-up scaled into them."""
    batch = load_finetune_config(cfg.config, list(cfg.overrides)).train.batch_size
    return cfg.iters * batch / (ONE_X_ITERS * BASE_BATCH)


def probe_val(cfg: ProbeConfig, root: Path) -> Path:
    """The val file a probe is scored on: ``probe.val`` or its fixed ``val_subset``, written under
    ``root`` when the run starts (the same images for every probe; the same bytes for the same
    file and size, and the current ``probe.val`` after a resume that changed it)."""
    return fixed_val_subset(cfg.val, cfg.val_subset, root)


def probe_command(cfg: ProbeConfig, init: str, run_dir: Path, scale: float, val: Path | None = None) -> list[str]:
    """``python -m predet finetune ...`` of one probe: the user's probe overrides come last but
    for the folder, seed and resumption, which the probe owns."""
    items = [f"init={init}", f"data.train={cfg.data}", f"data.train_images={cfg.images}",
             f"data.val={val or cfg.val}", f"data.val_images={cfg.val_images}", "data.test=",
             f"data.subset={cfg.subset}", "data.subset_seed=0", "schedule=1x", f"schedule_scale={scale!r}",
             "train.eval_period=0", "train.progress=false", f"train.checkpoint_period={cfg.iters}",
             "eval.visualize=0", f"train.device={cfg.device}", *(["model.freeze_at=5"] if cfg.freeze_backbone else []),
             *cfg.overrides,
             f"train.run_dir={run_dir}", f"train.seed={cfg.seed}", "train.resume=true"]
    return [sys.executable, "-m", "predet", "finetune", "--config", str(cfg.config), *items]


def read_probe(run_dir: Path) -> dict | None:
    """The val metrics a finished probe wrote, or None."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    metrics = {m: results.get("val", {}).get(m) for m in METRICS if results.get("val", {}).get(m) is not None}
    return metrics or None


@dataclass
class RunningProbe:
    process: subprocess.Popen
    started: float
    run_dir: Path
    iteration: int


class TransferProbeHook:
    """Launches, watches and logs the probes of a pre-training run (rank 0 does the work).

    At most ``MAX_RUNNING`` probes run at once: when probes take longer than ``probe.period``
    iterations, the run waits for the oldest instead of piling them up on its cores."""

    MAX_RUNNING = 2

    def __init__(self, cfg: ProbeConfig):
        self.cfg = cfg
        self.scale = probe_schedule_scale(cfg)
        self.running: dict[str, RunningProbe] = {}
        self.waited = 0.0  # seconds the run spent waiting for probes
        self.val_file: Path | None = None  # the (subset of the) val split every probe is scored on

    # ------------------------------------------------------------------ hooks

    def before_train(self, trainer) -> None:
        if trainer.rank != 0:
            return
        root = Path(trainer.run_dir) / "probe"
        self.val_file = probe_val(self.cfg, root)
        logged = self._logged(trainer)
        if not read_probe(root / FLOOR):
            self._launch(trainer, FLOOR, SCRATCH_INIT, 0)
        elif FLOOR not in logged:
            self._log(trainer, FLOOR, 0, root / FLOOR, None)
        # what a killed run left: finished probes not logged yet, started ones to finish
        for folder in sorted(root.glob("iter*")) if root.is_dir() else []:
            it = int(folder.name.removeprefix("iter"))
            if it > trainer.start_iter or folder.name in logged:
                continue
            if read_probe(folder):
                self._log(trainer, folder.name, it, folder, None)
            elif (folder / "init.pth").is_file():
                self._launch(trainer, folder.name, str(folder / "init.pth"), it)

    def after_step(self, trainer) -> None:
        if trainer.rank != 0:
            return
        it = trainer.iteration
        if it % self.cfg.period == 0 or it == trainer.max_iters:
            folder = Path(trainer.run_dir) / "probe" / f"iter{it:07d}"
            if read_probe(folder):  # a resumed run back at weights it probed before (bit-exact)
                self._log(trainer, folder.name, it, folder, None)
            else:
                weights = folder / "init.pth"
                save_checkpoint(weights, {"model": trainer.model.state_dict(), "iteration": it,
                                          "config": trainer.config_dict, "extra_state": trainer.extra_state})
                self._launch(trainer, folder.name, str(weights), it)
        self._collect(trainer, wait=not self.cfg.background)

    def after_train(self, trainer) -> None:
        if trainer.rank != 0:
            return
        if self.running:
            logger.info("waiting for %d transfer probe(s) still running: %s", len(self.running),
                        ", ".join(self.running))
        self._collect(trainer, wait=True)
        logger.info("transfer probes: the run waited %.0f s for them", self.waited)

    # ------------------------------------------------------------------ work

    def _launch(self, trainer, name: str, init: str, iteration: int) -> None:
        while len(self.running) >= self.MAX_RUNNING:
            self._collect(trainer, wait=True, only=next(iter(self.running)))
        run_dir = Path(trainer.run_dir) / "probe" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = probe_command(self.cfg, init, run_dir, self.scale, self.val_file)
        with open(run_dir / "probe.log", "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       env=standalone_env(self.cfg.threads),
                                       preexec_fn=die_with_parent if sys.platform == "linux" else None)
        self.running[name] = RunningProbe(process, time.time(), run_dir, iteration)

    def _collect(self, trainer, wait: bool, only: str | None = None) -> None:
        """Log the probes that finished (all of them, or ``only`` that one, waiting, when ``wait``)."""
        start = time.time()
        for name, probe in list(self.running.items()):
            if only is not None and name != only:
                continue
            process, run_dir = probe.process, probe.run_dir
            if wait:
                process.wait()
            if process.poll() is None:
                continue
            del self.running[name]
            if process.returncode != 0:
                tail = (run_dir / "probe.log").read_text(errors="replace").strip().splitlines()[-3:]
                logger.warning("transfer probe %s failed (exit %s), see %s: %s", name, process.returncode,
                               run_dir / "probe.log", " | ".join(tail))
                continue
            if not self._log(trainer, name, probe.iteration, run_dir, time.time() - probe.started):
                logger.warning("transfer probe %s finished without val metrics; see %s", name, run_dir / "probe.log")
        if wait:
            self.waited += time.time() - start

    def _log(self, trainer, name: str, iteration: int, run_dir: Path, seconds: float | None) -> bool:
        """Write a finished probe's record; False when it has no val metrics."""
        metrics = read_probe(run_dir)
        if not metrics:
            return False
        suffix = "_scratch" if name == FLOOR else ""
        record = {"iteration": iteration, "probe": name, **{f"probe/{m}{suffix}": v for m, v in metrics.items()}}
        if seconds is not None:
            record[f"probe/seconds{suffix}"] = seconds
        trainer.writer.write(record)
        _tidy(run_dir)
        what = "from random weights (the floor)" if name == FLOOR else f"from iteration {iteration}'s weights"
        logger.info("transfer probe %s: val box AP %.1f%s", what, 100 * metrics.get("bbox/AP", float("nan")),
                    f" ({seconds:.0f} s)" if seconds is not None else "")
        return True

    @staticmethod
    def _logged(trainer) -> set[str]:
        path = Path(trainer.run_dir) / METRICS_FILE
        return {r["probe"] for r in read_metrics(path) if "probe" in r} if path.is_file() else set()


def _tidy(run_dir: Path) -> None:
    """A logged probe keeps its results, config and logs; its weights (the pre-training's, the
    detector's) go: tens of MB a probe, and nothing reads them again."""
    (run_dir / "init.pth").unlink(missing_ok=True)
    for path in (run_dir / "checkpoints").glob("*.pth") if (run_dir / "checkpoints").is_dir() else []:
        path.unlink()
