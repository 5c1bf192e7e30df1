"""Fault injection (issue 10): real SIGKILLs, truncated files, full disks, damaged checkpoints.

Each test breaks a run the way a crash, an operator or a full disk would, then checks that the
next start recovers (bit-exactly where promised) or stops with one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import CrashAt, tiny_pretrain_config

from predet.checkpoint.io import latest_checkpoint, load_checkpoint
from predet.data.shards import write_webdataset_shards
from predet.pretrain import pretrain

ITERS, PERIOD = 4, 3  # resume from iteration 3: odd, so two loader workers swap streams


@pytest.fixture(scope="module")
def weak_set(fashiondet_tiny) -> Path:
    return fashiondet_tiny / "weak"


@pytest.fixture(scope="module")
def shards(weak_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "weak"
    write_webdataset_shards(weak_set / "labels.jsonl", out, shard_size=8)
    return out


def shard_config(weak_set, shards, run_dir, **extra):
    extra = {"data.train": shards, "data.vocab": shards / "vocab.json",
             "train.checkpoint_period": PERIOD, "train.log_period": 1, **extra}
    return tiny_pretrain_config(weak_set, run_dir, ITERS, **extra)


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(Path(run_dir) / "checkpoints" / "model_final.pth")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


# ----------------------------------------------------------------------------- item 1


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_same_batch(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}: {key}"
        else:
            assert a[key] == b[key], f"{where}: {key}"


@pytest.mark.parametrize("workers,world", [(0, 1), (1, 1), (2, 1), (2, 2)])
def test_shard_loader_resumed_at_k_yields_the_tail_of_the_full_stream(
        weak_set, shards, tmp_path, monkeypatch, workers, world):
    """Batch i of a loader resumed at k is batch i of the uninterrupted loader, per rank."""
    from predet.data.build import build_weak_dataset
    from predet.data.views import TwoViewTransform
    from predet.pretrain import build_pretrain_loader

    cfg = shard_config(weak_set, shards, tmp_path, **{"train.num_workers": workers,
                                                       "data.views.size": 32})
    dataset, _ = build_weak_dataset(shards, None, TwoViewTransform(cfg.data.views), cfg.train.seed,
                                    repeat=True)
    total = 7  # crosses an epoch boundary of the 8-image shards per stream
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        full = _batches(build_pretrain_loader(dataset, cfg, 0, rank, world), total)
        for k in (3, 4):
            tail = _batches(build_pretrain_loader(dataset, cfg, k, rank, world), total - k)
            for i, (a, b) in enumerate(zip(full[k:], tail)):
                _assert_same_batch(a, b, f"rank {rank}, resumed at {k}, batch {k + i}")


def test_pretrain_from_shards_sigkilled_and_resumed_is_bit_exact(weak_set, shards, tmp_path):
    """``predet pretrain`` on shards with two loader workers, really SIGKILLed once its
    checkpoint at iteration 3 exists (odd: the workers swap streams), then resumed."""
    from helpers import CPU_PRETRAIN_CONFIG, tiny_pretrain_overrides

    extra = {"data.train": shards, "data.vocab": shards / "vocab.json", "train.num_workers": 2,
             "train.checkpoint_period": PERIOD, "train.log_period": 1}
    pretrain(shard_config(weak_set, shards, tmp_path / "straight", **{"train.num_workers": 2}))
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG),
            *tiny_pretrain_overrides(weak_set, run, ITERS, **extra)]
    proc = subprocess.Popen([sys.executable, "-m", "predet", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ckpt = run / "checkpoints" / f"checkpoint_{PERIOD:07d}.pth"
        _wait_for(lambda: ckpt.exists() or proc.poll() is not None, 300, "the first checkpoint")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        proc.kill()
    assert not (run / "checkpoints" / "model_final.pth").exists()
    cfg = shard_config(weak_set, shards, run, **{"train.num_workers": 2})
    pretrain(replace(cfg, train=replace(cfg.train, resume=True)))
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank, world, port):
    """This process as ``rank`` of a gloo group kept across several runs: (pretrain module, cleanup).

    The group is created here, before the first run: ``launched`` then leaves it to us instead of
    destroying it after each run, which made every run rebuild it on the same port (and, now and
    then, a rank's first collective of the next run read "connection reset by peer")."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import predet.pretrain as pretrain_module
    from predet.engine.distributed import cleanup, init_distributed

    assert init_distributed("cpu") == (rank, world, rank)  # one group for all the runs
    return pretrain_module, cleanup


def _ddp_shard_worker(rank, world, port, weak, shards, tmp):
    """Straight, crashed-after-checkpoint-3 and resumed shard pre-training in one process group."""
    pretrain_module, cleanup = _join_group(rank, world, port)
    weak, shards, tmp = Path(weak), Path(shards), Path(tmp)
    real_train = pretrain_module.train
    extra = {"train.batch_size": 2}
    try:
        pretrain(shard_config(weak, shards, tmp / "straight", **extra))
        pretrain_module.train = lambda *a, **k: real_train(*a, **{**k, "hooks": [CrashAt(PERIOD)]})
        cfg = shard_config(weak, shards, tmp / "run", **extra)
        try:
            pretrain(cfg)
        except KeyboardInterrupt:
            pass
        pretrain_module.train = real_train
        pretrain(replace(cfg, train=replace(cfg.train, resume=True)))
    finally:
        cleanup()


def test_two_process_gloo_shard_pretraining_resumes_bit_exactly(weak_set, shards, tmp_path):
    mp.spawn(_ddp_shard_worker, nprocs=2,
             args=(2, _free_port(), str(weak_set), str(shards), str(tmp_path)))
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint_{ITERS:07d}.pth"
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "run"))


_DIE_WHILE_SAVING = """
import io, os, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from toy_training import make_loader, new_model, solver_cfg, train_cfg
from predet.engine.trainer import train

real_save = torch.save

def save_and_die(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("iteration") == 20 and "optimizer" in obj:
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half of it on disk
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_and_die
train(new_model(), make_loader, solver_cfg(), train_cfg(Path({tmp!r}), "crashed", checkpoint_period=5))
"""


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_previous_one(tmp_path):
    from toy_training import make_loader, new_model, solver_cfg, train_cfg

    from predet.engine.trainer import train

    straight = new_model()
    train(straight, make_loader, solver_cfg(), train_cfg(tmp_path, "straight", checkpoint_period=5))
    script = _DIE_WHILE_SAVING.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert [p.name for p in ckpts.glob(".*.tmp")]  # the half-written file the kill left
    assert latest_checkpoint(tmp_path / "crashed").name == "checkpoint_0000015.pth"
    model = new_model()
    train(model, make_loader, solver_cfg(), train_cfg(tmp_path, "crashed", checkpoint_period=5, resume=True))
    assert model.calls == 15 and not list(ckpts.glob(".*.tmp"))
    assert_same_weights(straight.state_dict(), model.state_dict())


# ----------------------------------------------------------------------------- item 2


def _toy_run(tmp_path, name="run", **kw):
    from toy_training import solver_cfg, train_cfg

    # every checkpoint kept: these tests damage the newest and need the older ones
    return solver_cfg(**kw), train_cfg(tmp_path, name, checkpoint_period=5, keep_checkpoints=0)


def _toy_straight_and_crashed(tmp_path):
    """A 30-iteration toy run, and the same run crashed after its checkpoint at 25."""
    from toy_training import make_loader, new_model

    from predet.engine.trainer import train

    solver, cfg = _toy_run(tmp_path, "straight")
    straight = new_model()
    train(straight, make_loader, solver, cfg)
    cfg = replace(cfg, run_dir=str(tmp_path / "crashed"))
    with pytest.raises(KeyboardInterrupt):
        train(new_model(), make_loader, solver, cfg, hooks=[CrashAt(27)])
    return straight.state_dict(), solver, cfg


def _resume_toy(solver, cfg):
    from toy_training import make_loader, new_model

    from predet.engine.trainer import train

    model = new_model()
    result = train(model, make_loader, solver, replace(cfg, resume=True))
    return model, result


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    straight, solver, cfg = _toy_straight_and_crashed(tmp_path)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    newest = ckpts / "checkpoint_0000025.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # really truncated
    with caplog.at_level("WARNING", logger="predet.engine"):
        model, result = _resume_toy(solver, cfg)
    assert "skipping checkpoint" in caplog.text and "checkpoint_0000025.pth" in caplog.text
    assert "truncated or damaged" in caplog.text
    assert model.calls == 10  # resumed from 20, not from scratch
    assert_same_weights(straight, model.state_dict())


def test_last_checkpoint_naming_a_missing_file_does_not_restart(tmp_path):
    straight, solver, cfg = _toy_straight_and_crashed(tmp_path)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    (ckpts / "last_checkpoint").write_text("checkpoint_0000099.pth\n")
    (ckpts / "checkpoint_0000025.pth").unlink()
    older = (ckpts / "checkpoint_0000010.pth").read_bytes()
    model, result = _resume_toy(solver, cfg)
    assert model.calls == 10  # from 20: the older good checkpoints were used, not overwritten
    assert (ckpts / "checkpoint_0000010.pth").read_bytes() == older
    assert_same_weights(straight, model.state_dict())


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    from predet.errors import CheckpointError

    _, solver, cfg = _toy_straight_and_crashed(tmp_path)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    for path in ckpts.glob("checkpoint_*.pth"):
        path.write_bytes(b"PK\x03\x04 not a whole zip")
    before = sorted((p.name, p.read_bytes()) for p in ckpts.iterdir())
    with pytest.raises(CheckpointError, match="none loads.*refusing to start over"):
        _resume_toy(solver, cfg)
    assert sorted((p.name, p.read_bytes()) for p in ckpts.iterdir()) == before


def test_stale_temp_files_are_removed_on_the_next_start(tmp_path):
    _, solver, cfg = _toy_straight_and_crashed(tmp_path)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    stale = ckpts / ".checkpoint_0000030.pth.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    _resume_toy(solver, cfg)
    assert not stale.exists()
    assert not list(ckpts.glob(".*.tmp"))


# ----------------------------------------------------------------------------- item 6


def _wait_for(predicate, timeout: float, what: str):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _lock_pid(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / ".lock").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path):
    from predet.engine.runfolder import acquire_lock, release_lock
    from predet.errors import RunLocked

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = acquire_lock(tmp_path)  # stale: its process is gone
    assert _lock_pid(tmp_path) == os.getpid()
    release_lock(lock)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(RunLocked, match=f"in use by another run \\(pid {live.pid}\\)"):
            acquire_lock(tmp_path)
    finally:
        live.kill()
        live.wait()


def test_sweep_holds_its_folder_and_its_run_dies_with_it(fashiondet_tiny, tmp_path, capsys):
    """A live sweep refuses a second sweep and a finetune on its run; SIGKILL of the sweep
    also ends the run it launched, and the run's lock is then stale, not blocking."""
    from helpers import CPU_FINETUNE_CONFIG, tiny_finetune_overrides

    from predet.cli import main as cli_main
    from predet.engine.runfolder import release_lock

    out = tmp_path / "sweep"
    overrides = [o for o in tiny_finetune_overrides(fashiondet_tiny, tmp_path / "x", "scratch", 10_000)
                 if not o.startswith("train.run_dir=")]
    sweep_args = ["sweep", "--config", str(CPU_FINETUNE_CONFIG), *overrides, "--grid", "lr=0.01",
                  "--seeds", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "predet", *sweep_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = out / "lr0.01" / "seed0"
    try:
        child = _wait_for(lambda: _lock_pid(run), 240, "the sweep's run to take its lock")
        assert _lock_pid(out) == proc.pid and child != proc.pid
        assert cli_main(sweep_args) == 2
        assert f"in use by another sweep (pid {proc.pid})" in capsys.readouterr().err
        finetune_args = ["finetune", "--config", str(CPU_FINETUNE_CONFIG), *overrides, f"train.run_dir={run}"]
        assert cli_main(finetune_args) == 2
        assert f"in use by another fine-tuning (pid {child})" in capsys.readouterr().err
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not _pid_alive(child), 60, f"run pid {child} to end with its sweep")
    finally:
        proc.kill()
        proc.wait()
    for folder in (run, out):  # both locks are stale now, not blocking
        try:
            release_lock(_wait_for(lambda: _try_lock(folder), 30, f"{folder / '.lock'} to be free"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; held by {_lock_holders(folder / '.lock')}") from None


def _try_lock(folder: Path):
    """``acquire_lock(folder)``, or None while a process still holds it (it may take the
    kernel a moment to close a dead run's files)."""
    from predet.engine.runfolder import acquire_lock
    from predet.errors import RunLocked

    try:
        return acquire_lock(folder)
    except RunLocked:
        return None


def _lock_holders(lock: Path) -> list[str]:
    """Every process with ``lock`` open, as "pid cmdline": what a failure should name."""
    holders = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if Path(os.readlink(fd)) == lock.resolve():
                pid = fd.parts[2]
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(bytes(1), b" ").decode()
                holders.append(f"{pid} {cmdline[:200]}")
        except OSError:
            continue
    return holders


def test_sweep_does_not_retry_a_run_that_failed_on_its_inputs(tmp_path, capsys):
    from helpers import CPU_FINETUNE_CONFIG

    from predet.tools.sweep.run import sweep

    out = tmp_path / "sweep"
    log = out / "lr-bad" / "seed0" / "log.txt"
    first = sweep(CPU_FINETUNE_CONFIG, {"lr": ["bad"]}, seeds=1, out_dir=out)
    assert first["runs"][0]["status"] == "failed" and log.read_text().count("\n=== ") == 1
    again = sweep(CPU_FINETUNE_CONFIG, {"lr": ["bad"]}, seeds=1, out_dir=out)
    assert again["runs"][0]["status"] == "failed" and log.read_text().count("\n=== ") == 1
    text = capsys.readouterr().out
    assert "failed earlier (exit 2), not retried" in text and "--retry-failed" in text
    sweep(CPU_FINETUNE_CONFIG, {"lr": ["bad"]}, seeds=1, out_dir=out, retry_failed=True)
    assert log.read_text().count("\n=== ") == 2


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs): writes past it fail with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.fail("no mount command: the full-disk cases need a small tmpfs (CI runs as root with mount)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"mounting a small tmpfs is not permitted here ({done.stderr.strip()}); "
                    "the full-disk cases need root or CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_writing_shards_is_one_line_and_leaves_nothing(weak_set, small_disk, capsys):
    from predet.cli import main as cli_main

    out = small_disk / "shards"
    assert cli_main(["data", "shards", "--labels", str(weak_set / "labels.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if ": error: " in l]
    assert len(line) == 1 and "Traceback" not in err
    assert line[0].startswith("predet data: error: no space left on device while writing ")
    assert "shard-" in line[0]
    assert not out.exists()


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(small_disk, tmp_path):
    """The disk fills up between two checkpoints: the second save fails naming its file, the
    first stays loadable, no temp file is left, and the run resumes once there is room."""
    from toy_training import make_loader, new_model, solver_cfg, train_cfg

    from predet.engine.trainer import train
    from predet.errors import DiskFull

    class FillDisk:
        def after_step(self, state):
            if state.iteration == 7:
                with open(small_disk / "filler", "wb", buffering=0) as f:
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                    except OSError:
                        pass  # the disk is full now

    solver = solver_cfg(max_iters=10, milestones=[])
    cfg = train_cfg(small_disk, "run", checkpoint_period=5, log_period=100)
    with pytest.raises(DiskFull, match="no space left on device while writing .*checkpoint_0000010.pth"):
        train(new_model(), make_loader, solver, cfg, hooks=[FillDisk()])
    ckpts = small_disk / "run" / "checkpoints"
    assert load_checkpoint(ckpts / "checkpoint_0000005.pth")["iteration"] == 5
    assert not list(ckpts.glob(".*.tmp"))
    (small_disk / "filler").unlink()
    model = new_model()
    assert train(model, make_loader, solver, replace(cfg, resume=True)).iteration == 10
    assert model.calls == 5


# ----------------------------------------------------------------------------- damaged shards


def _damaged_copy(shards: Path, tmp_path: Path, truncated=(), garbage=()) -> tuple[Path, list[str]]:
    """The 8 shards in a folder of their own, some cut in half (a copy that died) or overwritten."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    names = sorted(p.name for p in out.glob("*.tar"))
    for i in truncated:
        path = out / names[i]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for i in garbage:
        (out / names[i]).write_bytes(os.urandom(3000))
    return out, [str(out / names[i]) for i in (*truncated, *garbage)]


def _damaged_run(weak_set, shards, run_dir, iters=18, **extra):
    # 64 images in 8 shards, batch 4: 18 iterations read every shard at least once
    return tiny_pretrain_config(weak_set, run_dir, iters, **{
        "data.train": shards, "data.vocab": shards / "vocab.json", "train.checkpoint_period": 9,
        "train.max_skipped_fraction": 0.25, **extra})


def test_damaged_shards_among_good_ones_are_skipped_named_and_the_run_goes_on(weak_set, shards, tmp_path):
    data, bad = _damaged_copy(shards, tmp_path, truncated=[2], garbage=[5])
    result = pretrain(_damaged_run(weak_set, data, tmp_path / "run"))
    assert result.iteration == 18 and (tmp_path / "run" / "checkpoints" / "model_final.pth").is_file()
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    damaged = {r["path"]: r["reason"] for r in listed if r["reason"].startswith("damaged shard")}
    assert sorted(damaged) == sorted(bad)  # named once each, however many epochs re-read them
    assert "samples after the first 0 were skipped" in damaged[bad[1]]  # garbage: nothing read from it
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_0000018.pth")
    assert sorted(p for p, _ in ckpt["damaged_shards"]) == sorted(bad)
    assert all(n == 8 for _, n in ckpt["damaged_shards"])


def test_a_run_with_damaged_shards_resumes_bit_exactly(weak_set, shards, tmp_path, monkeypatch):
    import predet.pretrain as pretrain_module

    data, _ = _damaged_copy(shards, tmp_path, truncated=[1])
    pretrain(_damaged_run(weak_set, data, tmp_path / "straight"))
    real_train = pretrain_module.train
    monkeypatch.setattr(pretrain_module, "train", lambda *a, **k: real_train(*a, **{**k, "hooks": [CrashAt(9)]}))
    with pytest.raises(KeyboardInterrupt):
        pretrain(_damaged_run(weak_set, data, tmp_path / "run"))
    monkeypatch.setattr(pretrain_module, "train", real_train)
    pretrain(_damaged_run(weak_set, data, tmp_path / "run", **{"train.resume": "true"}))
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "run"))
    assert (tmp_path / "straight" / "skipped.jsonl").read_text() == (tmp_path / "run" / "skipped.jsonl").read_text()


def test_more_damaged_shards_than_allowed_stop_the_run_with_one_line(weak_set, shards, tmp_path, capsys):
    from helpers import CPU_PRETRAIN_CONFIG, tiny_pretrain_overrides

    from predet.cli import main as cli_main

    data, bad = _damaged_copy(shards, tmp_path, truncated=[0, 3], garbage=[6])  # 3 of 8 > 0.25
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *tiny_pretrain_overrides(weak_set, tmp_path / "run", 18, **{
        "data.train": data, "data.vocab": data / "vocab.json", "train.max_skipped_fraction": 0.25})]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 8 shards are damaged" in err[0] and "max_skipped_fraction=0.25" in err[0]
    assert any(path in err[0] for path in bad)
    listed = (tmp_path / "run" / "skipped.jsonl").read_text()
    assert all(path in listed for path in bad)


# ----------------------------------------------------------------------------- pre-emption (issue 21)

PREEMPT_ITERS = 40


def _preemptible_run(weak_set, shards, run: Path, **extra) -> subprocess.Popen:
    """``predet pretrain`` on shards with two loader workers, in its own process group (as a
    terminal's or a scheduler's job is), logging every step and checkpointing only at the end."""
    from helpers import CPU_PRETRAIN_CONFIG, tiny_pretrain_overrides

    items = {"data.train": shards, "data.vocab": shards / "vocab.json", "train.num_workers": 2,
             "train.checkpoint_period": 1000, "train.log_period": 1, **extra}
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *tiny_pretrain_overrides(weak_set, run, PREEMPT_ITERS, **items)]
    return subprocess.Popen([sys.executable, "-m", "predet", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _logged_iteration(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line).get("iteration", 0) for line in lines if line.strip()), default=0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_resume_is_bit_exact(weak_set, shards, tmp_path, signum):
    # SIGTERM is what SLURM and Kubernetes send before a pre-emption; SIGINT (Ctrl-C) reaches the
    # whole process group, loader workers included
    run = tmp_path / "run"
    proc = _preemptible_run(weak_set, shards, run)
    try:
        _wait_for(lambda: _logged_iteration(run) >= 3 or proc.poll() is not None, 300, "three logged steps")
        os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("predet pretrain:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} at iteration" in lines[0] and "train.resume=true" in lines[0]
    stopped_at = int(lines[0].split("at iteration ")[1].split()[0])
    assert 3 <= stopped_at < PREEMPT_ITERS
    assert latest_checkpoint(run).name == f"checkpoint_{stopped_at:07d}.pth" and not (run / ".lock").exists()
    assert not (run / "checkpoints" / "model_final.pth").exists()
    extra = {"train.num_workers": 2, "train.checkpoint_period": 1000}
    cfg = shard_config(weak_set, shards, run, **extra)
    cfg = replace(cfg, solver=replace(cfg.solver, max_iters=PREEMPT_ITERS))
    pretrain(replace(cfg, train=replace(cfg.train, resume=True)))
    straight = replace(cfg, train=replace(cfg.train, run_dir=str(tmp_path / "straight")))
    pretrain(straight)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run))


def test_a_second_signal_stops_at_once():
    script = ("import os, signal, sys\n"
              "from predet.engine.preemption import StopSignals\n"
              "with StopSignals() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    assert stop.requested() == signal.SIGTERM\n"
              "    print('first taken', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('still alive', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stdout.split() == ["first", "taken"]


def _ctrl_c_as_in_a_terminal():
    """A child inherits an ignored SIGINT (Python then keeps ignoring it); in the full suite the
    pytest process can carry one, so the command starts with SIGINT as a shell gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_outside_training_is_one_line(tmp_path):
    # building data, evaluating: no checkpoint to write, but no traceback either
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "predet", "data", "fashiondet", "--out", str(out), "--size", "small"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        # the marker is written when rendering starts (the folder itself exists from the CLI's first check)
        _wait_for(lambda: (out / ".fashiondet-incomplete").exists() or proc.poll() is not None, 120,
                  "the build to start")
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "predet data: interrupted", stderr[-2000:]
    assert "Traceback" not in stderr


def _contend_for_lock(folder: str, barrier, holders, results, index: int) -> None:
    from predet.engine.runfolder import acquire_lock, release_lock
    from predet.errors import RunLocked

    barrier.wait()
    try:
        lock = acquire_lock(folder)
    except RunLocked:
        results[index] = 0
        barrier.wait()
        return
    with holders.get_lock():
        holders.value += 1
    results[index] = 1
    barrier.wait()  # hold it until every contender has tried
    release_lock(lock)


def test_a_stale_lock_taken_over_by_many_at_once_has_one_holder(tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    dead = subprocess.Popen(["true"])
    dead.wait()
    contenders = 4
    for round_ in range(25):
        folder = tmp_path / f"r{round_}"
        folder.mkdir()
        (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        barrier, holders = ctx.Barrier(contenders), ctx.Value("i", 0)
        results = ctx.Array("i", [-1] * contenders)
        procs = [ctx.Process(target=_contend_for_lock, args=(str(folder), barrier, holders, results, i))
                 for i in range(contenders)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
        assert holders.value == 1 and sorted(results) == [0] * (contenders - 1) + [1], (round_, list(results))
        assert not (folder / ".lock").exists()


def test_a_loader_worker_with_only_an_empty_shard_stops_the_run_with_one_line(weak_set, tmp_path, capsys):
    # it used to drop out of the DataLoader's rotation, so batch order, and resume, hung on timing
    from helpers import CPU_PRETRAIN_CONFIG, tiny_pretrain_overrides

    from predet.cli import main as cli_main

    shards = tmp_path / "shards"
    write_webdataset_shards(weak_set / "labels.jsonl", shards, shard_size=32)
    with tarfile.open(shards / "shard-000009.tar", "w"):
        pass  # a valid tar with no samples
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *tiny_pretrain_overrides(
        weak_set, tmp_path / "run", 4, **{"data.train": shards, "data.vocab": shards / "vocab.json", "train.num_workers": 3})]
    capsys.readouterr()
    assert cli_main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "only empty shards" in lines[0] and "shard-000009.tar" in lines[0], lines[0]


def test_a_run_stopped_by_a_loader_worker_leaves_no_worker_behind(weak_set, tmp_path):
    """The error's traceback holds the loader's iterator in a reference cycle; with the collector
    off nothing frees it, yet its workers (which ignore SIGTERM) are gone when the call returns,
    and the interpreter exits (it used to wait on them forever: the CI run that never ended)."""
    from helpers import CPU_PRETRAIN_CONFIG, tiny_pretrain_overrides

    shards = tmp_path / "shards"
    write_webdataset_shards(weak_set / "labels.jsonl", shards, shard_size=32)
    with tarfile.open(shards / "shard-000009.tar", "w"):
        pass
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *tiny_pretrain_overrides(
        weak_set, tmp_path / "run", 4, **{"data.train": shards, "data.vocab": shards / "vocab.json", "train.num_workers": 3})]
    code = (
        "import gc, multiprocessing, sys\n"
        "gc.disable()\n"
        "from predet.cli import main\n"
        f"code = main({[str(a) for a in args]!r})\n"
        "left = multiprocessing.active_children()\n"
        "print('exit', code, 'left', len(left), flush=True)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).parent)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit within 120 s: it waits on loader workers that ignore SIGTERM")
    assert "exit 2 left 0" in done.stdout, (done.stdout, done.stderr[-2000:])


class _SignalSelfAt:
    """A hook that sends this process SIGTERM after step ``at``: a signal that reached one rank."""

    def __init__(self, at: int, rank: int):
        self.at, self.rank = at, rank

    def after_step(self, state):
        if state.iteration == self.at and state.rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def _ddp_signal_worker(rank, world, port, weak, shards, tmp):
    """Straight, SIGTERMed-on-rank-1-at-step-3 and resumed shard pre-training in one group."""
    from predet.errors import Preempted

    pretrain_module, cleanup = _join_group(rank, world, port)
    weak, shards, tmp = Path(weak), Path(shards), Path(tmp)
    real_train = pretrain_module.train
    extra = {"train.batch_size": 2, "train.checkpoint_period": 1000}
    try:
        pretrain(shard_config(weak, shards, tmp / "straight", **extra))
        pretrain_module.train = lambda *a, **k: real_train(*a, **{**k, "hooks": [_SignalSelfAt(PERIOD, 1)]})
        cfg = shard_config(weak, shards, tmp / "run", **extra)
        try:
            pretrain(cfg)
            raise AssertionError(f"rank {rank} did not stop")
        except Preempted as exc:
            assert exc.iteration == PERIOD and exc.signum == signal.SIGTERM, (rank, exc.iteration)
        pretrain_module.train = real_train
        pretrain(replace(cfg, train=replace(cfg.train, resume=True)))
    finally:
        cleanup()


def test_two_process_gloo_run_stops_on_every_rank_when_one_is_signalled(weak_set, shards, tmp_path):
    # under torchrun a signal may reach one rank first: every rank must stop at the same step
    mp.spawn(_ddp_signal_worker, nprocs=2, args=(2, _free_port(), str(weak_set), str(shards), str(tmp_path)))
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint_0000004.pth"
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint_{PERIOD:07d}.pth").exists()
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "run"))
