"""The path users run: the CLI under ``torchrun --standalone --nproc_per_node 2`` on CPU (gloo).

Each check compares the 2-process run with what one process computes: the schedule a
fine-tuning resolves, the subset it writes, the scores of ``predet eval``, the detections of
``predet predict``, and the held-out pretext signals. Single-process references run as
subprocesses with one thread too, so both sides do the same arithmetic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    CPU_FINETUNE_CONFIG,
    CPU_PRETRAIN_CONFIG,
    probe_overrides,
    tiny_finetune_overrides,
    tiny_pretrain_overrides,
)

from predet.cli import main as cli_main
from predet.config import to_dict
from predet.data.shards import write_webdataset_shards
from predet.finetune import load_finetune_config, resolve_solver

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}


def run(args: list[str], nproc: int = 2, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``args`` (a module or script and its arguments) under torchrun with ``nproc`` processes,
    or as one plain process when ``nproc`` is 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def finetune_overrides(fashiondet, run_dir, batch_size: int) -> list[str]:
    """A named schedule (1x, shrunk) on a 20-image subset: what must resolve at the total batch."""
    return tiny_finetune_overrides(fashiondet, run_dir, "scratch", **{
        "schedule": "1x", "schedule_scale": 0.00004, "solver.max_iters": 1000, "solver.milestones": "[]",
        "data.subset": 20, "train.batch_size": batch_size, "train.checkpoint_period": 4,
        "train.eval_period": 4, "eval.batch_size": 3})


@pytest.fixture(scope="module")
def ddp_finetune(fashiondet_tiny, tmp_path_factory):
    """One 2-process fine-tuning at 2 images per process, with a spy on the subset writes."""
    tmp = tmp_path_factory.mktemp("ddp_finetune")
    spy = tmp / "subset_writes.txt"
    args = ["finetune", "--config", str(CPU_FINETUNE_CONFIG), *finetune_overrides(fashiondet_tiny, tmp / "run", 2)]
    proc = run([str(TESTS / "torchrun_driver.py"), str(spy), *args])
    return tmp / "run", spy, proc


def test_two_process_finetune_runs_the_schedule_of_its_total_batch(ddp_finetune, fashiondet_tiny, tmp_path):
    run_dir, spy, proc = ddp_finetune
    # what one process resolves at twice the batch (4 images per step)
    one = resolve_solver(load_finetune_config(CPU_FINETUNE_CONFIG,
                                              finetune_overrides(fashiondet_tiny, tmp_path / "one", 4)), 1)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["solver"] == to_dict(one) and results["processes"] == 2
    assert results["iteration"] == one.max_iters == 14 and one.milestones == [10, 13]
    assert one.lr == pytest.approx(0.0025)  # 0.01 at batch 16, x 4/16
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in metrics) == one.max_iters
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert [(e["iteration"], e["split"]) for e in evals] == [(4, "val"), (8, "val"), (12, "val"), (14, "val")]
    assert proc.stdout.count("fine-tuning finished") == 1  # rank 0 reports, once


def test_two_process_finetune_writes_its_subset_and_reports_once(ddp_finetune):
    run_dir, spy, _ = ddp_finetune
    assert spy.read_text().split() == ["0"]  # rank 0 wrote it; rank 1 waited and read it
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["train.subset20.seed0.json"]
    assert len(json.loads((run_dir / "data" / "train.subset20.seed0.json").read_text())["images"]) == 20
    assert json.loads((run_dir / "init_report.json").read_text())
    assert not list(run_dir.rglob("*.tmp"))


def test_print_config_under_torchrun_shows_what_will_run(fashiondet_tiny, tmp_path, capsys):
    args = ["--config", str(CPU_FINETUNE_CONFIG), "--print-config"]
    two = run(["-m", "predet", "finetune", *args[:2], *finetune_overrides(fashiondet_tiny, tmp_path / "a", 2),
               args[2]]).stdout
    assert cli_main(["finetune", *args[:2], *finetune_overrides(fashiondet_tiny, tmp_path / "a", 4), args[2]]) == 0
    one = capsys.readouterr().out
    line = lambda text: [l for l in text.splitlines() if l.startswith("# schedule=1x")]
    assert line(two) == ["# schedule=1x at batch 4 (2 per process x 2 processes) runs: lr=0.0025, max_iters=14, "
                         "warmup_iters=1, milestones=[10, 13]"]
    assert line(one)[0].split(" runs: ")[1] == line(two)[0].split(" runs: ")[1]
    assert two.count("\ntrain:\n") == 1  # rank 0 prints the config; rank 1 prints nothing


def _scores(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in ("images_per_s", "checkpoint")}


def test_two_process_eval_and_predict_equal_one_process(ddp_finetune, fashiondet_tiny, tmp_path):
    run_dir, _, _ = ddp_finetune
    det = fashiondet_tiny / "det"
    ckpt = run_dir / "checkpoints" / "model_final.pth"
    for nproc in (1, 2):  # 16 images in batches of 3: 6 batches, the last one short
        run(["-m", "predet", "eval", "--checkpoint", str(ckpt), "--data", str(det / "annotations" / "val.json"),
             "--images", str(det / "images"), "--batch-size", "3", "--out", str(tmp_path / f"eval{nproc}")], nproc)
        run(["-m", "predet", "predict", "--checkpoint", str(ckpt), "--images", str(det / "annotations" / "val.json"),
             "--image-root", str(det / "images"), "--batch-size", "3", "--no-progress",
             "--out", str(tmp_path / f"predict{nproc}")], nproc)
    one, two = _scores(tmp_path / "eval1" / "eval_results.json"), _scores(tmp_path / "eval2" / "eval_results.json")
    assert one == two and one["bbox/AP"] >= 0
    for folder in ("eval", "predict"):
        detections = [(tmp_path / f"{folder}{n}" / "coco_instances_results.json").read_text() for n in (1, 2)]
        assert detections[0] == detections[1] and len(json.loads(detections[0])) > 16


def test_two_process_pretext_signals_equal_one_process(fashiondet_tiny, tmp_path):
    """The held-out diagnostics, sharded over two ranks (batches 0, 2 and 1 on one, 3 images of
    the whole-image mAP set in three batches), are those one process logs."""
    weak = fashiondet_tiny / "weak"
    shards = tmp_path / "heldout_shards"
    write_webdataset_shards(weak / "heldout_clean.jsonl", shards, shard_size=5, vocab=None)
    for heldout in (weak / "heldout_clean.jsonl", shards):
        out = {n: tmp_path / f"{heldout.name}{n}.json" for n in (1, 2)}
        for n in (1, 2):
            run([str(TESTS / "torchrun_pretext.py"), str(heldout), str(weak / "vocab.json"), str(out[n])], n)
        one, two = (json.loads(out[n].read_text()) for n in (1, 2))
        assert one == two and set(one) >= {"pretext/crpn_recall@0.5", "pretext/nce_top1", "pretext/cls_mAP"}


def test_two_process_pretraining_on_shards_scales_its_solver_and_logs_heldout_signals(fashiondet_tiny, tmp_path):
    weak = fashiondet_tiny / "weak"
    shards, heldout = tmp_path / "shards", tmp_path / "heldout"
    write_webdataset_shards(weak / "labels.jsonl", shards, shard_size=16)
    write_webdataset_shards(weak / "heldout_clean.jsonl", heldout, shard_size=8, vocab=None)
    # the solver is given at 8 images per step; 2 processes x 2 images run twice its iterations
    extra = {"data.train": shards, "data.vocab": shards / "vocab.json", "data.val": heldout, "data.val_pairs": 8,
             "data.val_max_images": 12, "train.eval_period": 3, "train.batch_size": 2, "reference_batch": 8,
             "solver.warmup_iters": 0}
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *tiny_pretrain_overrides(weak, tmp_path / "run", 3, **extra)]
    printed = run(["-m", "predet", *args, "--print-config"]).stdout
    assert "# reference_batch=8 at batch 4 (2 per process x 2 processes) runs: lr=0.005, max_iters=6" in printed
    run(["-m", "predet", *args])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in records) == 6
    pretext = [r["iteration"] for r in records if "pretext/cls_mAP" in r]
    assert pretext == [3, 6]
    # the cosine of the scaled run: at its third step (iteration 2 of 6), 0.005 x (1 + cos(pi/3)) / 2
    assert [r["lr"] for r in records if r["iteration"] == 3 and "lr" in r][0] == pytest.approx(0.005 * 0.75, rel=1e-6)


def test_too_few_shards_for_the_ranks_is_one_line_under_torchrun(fashiondet_tiny, tmp_path):
    weak = fashiondet_tiny / "weak"
    shards = tmp_path / "one_shard"
    write_webdataset_shards(weak / "labels.jsonl", shards, shard_size=1000)
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *tiny_pretrain_overrides(
        weak, tmp_path / "run", 2, **{"data.train": shards, "data.vocab": shards / "vocab.json"})]
    proc = run(["-m", "predet", *args], check=False)
    assert proc.returncode != 0  # torchrun's own exit code; each rank exits 2 with one line
    lines = [l for l in proc.stderr.splitlines() if l.startswith("predet pretrain: error:")]
    assert len(lines) == 2 and all("1 shard(s) cannot be split over 2 ranks" in l for l in lines)
    assert "rank 1: " in lines[0] + lines[1]
    assert not re.search(r'File ".*predet/', proc.stderr)  # torchrun reports the exit; no predet traceback


def test_two_process_pretraining_runs_each_transfer_probe_once(fashiondet_tiny, tmp_path):
    """Rank 0 launches and logs the probes; the other rank trains on. Each probe runs once."""
    weak = fashiondet_tiny / "weak"
    extra = {**probe_overrides(fashiondet_tiny, **{"probe.val_subset": 8}), "train.batch_size": 2}
    run(["-m", "predet", "pretrain", "--config", str(CPU_PRETRAIN_CONFIG),
         *tiny_pretrain_overrides(weak, tmp_path / "run", 3, **extra)])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    names = sorted(r["probe"] for r in records if "probe" in r)
    assert names == ["iter0000002", "iter0000003", "scratch"]
    for name in names:
        log = (tmp_path / "run" / "probe" / name / "probe.log").read_text()
        assert log.count("\n=== ") == 1  # launched once, by one rank
