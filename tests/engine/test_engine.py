"""Tests of the shared training engine (CPU only, a few seconds each)."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import random
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import CrashAt
from torch import nn
from toy_training import (
    ToyNet,
    make_batch,
    make_loader,
    new_model,
    solver_cfg,
    train_cfg,
)

from predet.checkpoint.io import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_safetensors_weights,
    write_last_checkpoint,
)
from predet.config import ConfigError, SolverConfig, TrainConfig
from predet.engine.distributed import cleanup, move_to_device
from predet.engine.metrics import MetricsWriter, SmoothedValue, format_eta, read_metrics
from predet.engine.optim import build_lr_scheduler, build_optimizer, lr_at, param_groups
from predet.engine.resume import ResumeError
from predet.engine.trainer import train

# ----------------------------------------------------------------------------- schedules


def test_lr_warmup_and_milestones():
    s = SolverConfig(lr=0.1, max_iters=100, warmup_iters=10, warmup_factor=0.001,
                     milestones=[50, 80], gamma=0.1)
    assert lr_at(0, s) == pytest.approx(0.1 * 0.001)
    assert lr_at(5, s) == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert lr_at(10, s) == pytest.approx(0.1)
    assert lr_at(49, s) == pytest.approx(0.1)
    assert lr_at(50, s) == pytest.approx(0.01)
    assert lr_at(79, s) == pytest.approx(0.01)
    assert lr_at(80, s) == pytest.approx(0.001)
    assert lr_at(99, s) == pytest.approx(0.001)


def test_lr_cosine_endpoints():
    s = SolverConfig(lr=0.2, max_iters=100, warmup_iters=0, schedule="cosine")
    assert lr_at(0, s) == pytest.approx(0.2)
    assert lr_at(50, s) == pytest.approx(0.1)
    assert lr_at(100, s) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, s) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(i, s) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="schedule"):
        build_optimizer(nn.Linear(2, 2), SolverConfig(schedule="poly"))
    with pytest.raises(ValueError, match="milestones"):
        build_optimizer(nn.Linear(2, 2), SolverConfig(milestones=[20, 10]))


def test_scheduler_follows_lr_at_and_keeps_lr_mult_ratio():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    s = SolverConfig(lr=0.02, max_iters=40, warmup_iters=5, milestones=[20, 30], gamma=0.1)
    groups = param_groups(model, {"1": 4.0})
    opt = build_optimizer(groups, s)
    sched = build_lr_scheduler(opt, s)
    for it in range(40):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr_at(it, s, g["lr_mult"]))
        mults = {g["lr_mult"] for g in opt.param_groups}
        assert mults == {1.0, 4.0}
        head = next(g for g in opt.param_groups if g["lr_mult"] == 4.0)
        body = next(g for g in opt.param_groups if g["lr_mult"] == 1.0)
        assert head["lr"] == pytest.approx(4.0 * body["lr"])
        opt.step()
        sched.step()


def test_param_groups_no_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    opt = build_optimizer(model, SolverConfig(weight_decay=1e-4))
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model[0].weight)] == 1e-4
    for p in (model[0].bias, model[1].weight, model[1].bias, model[2].weight, model[2].bias):
        assert by_id[id(p)] == 0.0
    with pytest.raises(ValueError, match="mask_head"):
        param_groups(model, {"mask_head": 4.0})


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"w": torch.arange(4), "iteration": 1})

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(4), "iteration": 2})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


class _Payload:
    """Pickles to "call open(marker, 'w')": what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_load_refuses_code(tmp_path, fmt):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.ones(2)}, "x": _Payload(str(marker))}
    if fmt == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "rng.pth", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    ckpt = tmp_path / "checkpoints" / "checkpoint_0000010.pth"
    save_checkpoint(ckpt, {"iteration": 10})
    write_last_checkpoint(ckpt)
    assert latest_checkpoint(tmp_path) == ckpt
    ckpt.unlink()
    assert latest_checkpoint(tmp_path) is None


def test_safetensors_weights(tmp_path):
    from safetensors.torch import load_file

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].weight = model[0].bias  # shared storage must not break the export
    save_safetensors_weights(model, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    assert set(loaded) == set(model.state_dict())
    assert torch.equal(loaded["0.weight"], model[0].weight.detach())


# ----------------------------------------------------------------------------- helpers


def test_move_to_device_and_meters():
    batch = {"a": torch.ones(1), "b": [torch.zeros(1), (torch.ones(2), "x")], "c": 3}
    moved = move_to_device(batch, "cpu")
    assert moved["c"] == 3 and moved["b"][1][1] == "x" and isinstance(moved["b"][1], tuple)
    assert torch.equal(moved["b"][1][0], torch.ones(2))
    v = SmoothedValue(window=3)
    for x in (1.0, 2.0, 10.0, 3.0):
        v.update(x)
    assert v.median == 3.0 and v.avg == pytest.approx(5.0) and v.global_avg == 4.0
    assert format_eta(3725) == "1:02:05" and format_eta(math.nan) == "?"


def test_metrics_writer(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as w:
        w.write({"iteration": 1, "losses": {"loss": 1.0}})
    MetricsWriter(tmp_path / "off", enabled=False).write({"iteration": 1})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"iteration": 1, "losses": {"loss": 1.0}}]
    assert not (tmp_path / "off").exists()


# ----------------------------------------------------------------------------- the loop


def test_resume_is_bit_exact(tmp_path):
    solver = solver_cfg()
    straight = new_model()
    result = train(straight, make_loader, solver, train_cfg(tmp_path, "straight"))
    assert result.iteration == 30

    crashed = new_model()
    cfg = train_cfg(tmp_path, "crashed")
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        train(crashed, make_loader, solver, cfg, hooks=[CrashAt(20)])
    assert latest_checkpoint(cfg.run_dir).name == "checkpoint_0000020.pth"

    resumed = new_model()
    result = train(resumed, make_loader, solver, replace(cfg, resume=True))
    assert result.iteration == 30
    assert resumed.calls == 10  # only iterations 21..30 ran
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    final = load_checkpoint(Path(cfg.run_dir) / "checkpoints" / "model_final.pth")
    assert final["iteration"] == 30 and torch.equal(final["model"]["fc.weight"], b["fc.weight"])
    # metrics.jsonl holds each logged iteration once despite the crash.
    its = [r["iteration"] for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl")]
    assert its == [5, 10, 15, 20, 25, 30]


def test_only_the_newest_checkpoints_are_kept_and_resume_still_works(tmp_path):
    """train.keep_checkpoints=K: a multi-day run's folder holds K periodic checkpoints, not all."""
    solver = solver_cfg()
    cfg = train_cfg(tmp_path, "kept", checkpoint_period=5, keep_checkpoints=2)
    with pytest.raises(KeyboardInterrupt):
        train(new_model(), make_loader, solver, cfg, hooks=[CrashAt(22)])
    ckpts = Path(cfg.run_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint_*.pth")) == ["checkpoint_0000015.pth",
                                                                       "checkpoint_0000020.pth"]
    resumed = new_model()
    train(resumed, make_loader, solver, replace(cfg, resume=True, keep_checkpoints=1))  # may change on resume
    assert resumed.calls == 10
    assert sorted(p.name for p in ckpts.iterdir() if p.suffix == ".pth") == ["checkpoint_0000030.pth",
                                                                             "model_final.pth"]
    straight = new_model()
    train(straight, make_loader, solver, train_cfg(tmp_path, "all", checkpoint_period=5, keep_checkpoints=0))
    assert len(list((tmp_path / "all" / "checkpoints").glob("checkpoint_*.pth"))) == 6
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(ConfigError, match="keep_checkpoints=-1"):
        train(new_model(), make_loader, solver, train_cfg(tmp_path, "bad", keep_checkpoints=-1))


def test_resume_refuses_changed_config_and_allows_longer_run(tmp_path):
    solver = solver_cfg(max_iters=10, milestones=[])
    cfg = train_cfg(tmp_path)
    train(new_model(), make_loader, solver, cfg, extra_state={"vocab": ["a", "b"]})

    with pytest.raises(ResumeError) as err:
        train(new_model(), make_loader, replace(solver, lr=0.01, momentum=0.5),
              replace(cfg, resume=True), extra_state={"vocab": ["a", "b"]})
    assert "solver.lr" in str(err.value) and "solver.momentum" in str(err.value)
    with pytest.raises(ResumeError, match="extra_state.vocab"):
        train(new_model(), make_loader, solver, replace(cfg, resume=True),
              extra_state={"vocab": ["a", "c"]})

    # Finished run: returns at once, with the final weights loaded into the given model.
    model = new_model()
    done = train(model, make_loader, solver, replace(cfg, resume=True, progress=True),
                 extra_state={"vocab": ["a", "b"]})
    assert done.iteration == 10 and model.calls == 0
    saved = load_checkpoint(done.last_checkpoint)["model"]
    assert torch.equal(model.state_dict()["conv.weight"], saved["conv.weight"])

    # max_iters may grow; bookkeeping keys may change.
    model = new_model()
    longer = train(model, make_loader, replace(solver, max_iters=15),
                   replace(cfg, resume=True, log_period=3, num_workers=2),
                   extra_state={"vocab": ["a", "b"]})
    assert longer.iteration == 15 and model.calls == 5


def test_non_finite_loss_names_iteration(tmp_path):
    class NanAt(ToyNet):
        def forward(self, batch):
            out = super().forward(batch)
            if int(batch["it"]) == 7:
                out["loss_reg"] = out["loss_reg"] * float("nan")
            return out

    def loader(start):
        for i in itertools.count(start):
            yield {**make_batch(i), "it": torch.tensor(i)}

    torch.manual_seed(0)
    with pytest.raises(FloatingPointError) as err:
        train(NanAt(), loader, solver_cfg(), train_cfg(tmp_path))
    msg = str(err.value)
    assert "iteration 8" in msg and "loss_reg=nan" in msg and "loss_cls=" in msg
    assert "total_loss=nan" in msg


def test_metrics_and_skipped_images(tmp_path):
    def loader(start):
        for i in itertools.count(start):
            batch = make_batch(i)
            if i % 3 == 0:
                batch["skipped"] = [(f"img_{i}.jpg", "cannot decode")]
            if i == 4:
                batch["num_images"] = 0
            yield batch

    model = new_model()
    cfg = train_cfg(tmp_path)
    result = train(model, loader, solver_cfg(max_iters=10, clip_grad_norm=1.0), cfg)
    assert result.iteration == 10
    assert model.calls == 9  # the empty batch took no step
    assert result.skipped == 4  # batches 0, 3, 6, 9
    run = Path(cfg.run_dir)
    lines = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert lines[0] == {"path": "img_0.jpg", "reason": "cannot decode"} and len(lines) == 4
    records = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [5, 10]
    for r in records:
        assert {"iteration", "lr", "losses", "metrics", "images_per_s", "eta_s", "time"} <= set(r)
        assert {"total_loss", "loss_cls", "loss_reg"} == set(r["losses"])
        assert {"acc", "grad_norm"} <= set(r["metrics"]) and r["images_per_s"] > 0
    assert records[-1]["final"] and records[-1]["skipped"] == 4
    assert (run / "config.yaml").is_file()
    assert set(result.losses) == {"total_loss", "loss_cls", "loss_reg"}
    assert result.final_model.is_file()


def test_step_unscales_before_clipping():
    """fp16 runs only on CUDA; a CPU GradScaler exercises the same unscale-then-clip order."""
    from predet.engine.trainer import train_step

    def run(scaler):
        model = new_model(norm=False).eval()  # no dropout: both runs see the same function
        opt = build_optimizer(model, SolverConfig(lr=0.0, warmup_iters=0))
        sched = build_lr_scheduler(opt, SolverConfig(lr=0.0, warmup_iters=0))
        _, _, norm = train_step(model, make_batch(0), opt, sched, scaler, None, 1e-3, 0)
        clipped = torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in model.parameters() if p.grad is not None]))
        return float(norm), float(clipped)

    plain = run(torch.amp.GradScaler("cpu", enabled=False))
    scaled = run(torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert scaled[0] == pytest.approx(plain[0], rel=1e-5) and plain[0] > 1e-3
    assert scaled[1] == pytest.approx(1e-3, rel=1e-3)


# ----------------------------------------------------------------------------- DDP on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different inits: DDP must broadcast rank 0's weights
    model = ToyNet(norm=False)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def loader(start):
        for i in itertools.count(start):
            batch = make_batch(i, rank)
            if i == 2:
                batch["skipped"] = [(f"r{rank}_{i}.jpg", "truncated")]
            if i == 3 and rank == 1:
                batch["num_images"] = 0  # every rank must skip this step together
            yield batch

    try:
        cfg = TrainConfig(run_dir=os.path.join(out_dir, "run"), device="cpu", checkpoint_period=5,
                          log_period=4, progress=False)
        result = train(model, loader, solver_cfg(max_iters=8, warmup_iters=2, milestones=[]), cfg)
        assert result.iteration == 8 and result.skipped == 2 and model.calls == 7
        torch.save({"final": model.state_dict(), "init": init},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def test_ddp_gloo_two_processes(tmp_path):
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 80
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("DDP run did not finish in time")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert not torch.equal(r0["final"]["fc.weight"], r0["init"]["fc.weight"])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [4, 8]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_0000008.pth").is_file()
    skipped = (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()
    assert [json.loads(x)["path"] for x in skipped] == ["r0_2.jpg", "r1_2.jpg"]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_0000005.pth")
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
