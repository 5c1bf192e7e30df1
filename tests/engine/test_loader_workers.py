"""Training-loader workers ignore SIGTERM, so Python's exit cannot end them: a process that
still holds such an iterator at exit (a failed run's traceback in a reference cycle) must not
wait on them forever. Each case runs in its own interpreter with the garbage collector off, so
nothing but our code can end the workers before exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

EXIT_SECONDS = 60  # an interpreter that waits on its workers never exits; one that does takes ~1 s

CHILD = textwrap.dedent("""
    import gc, sys
    gc.disable()
    import torch
    from torch.utils.data import DataLoader
    from predet.engine.preemption import end_loader_workers, ignore_stop_signals, open_training_iter

    loader = DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
    data_iter = {opener}(loader)
    next(data_iter)
    if {end_now}:
        end_loader_workers(data_iter)
        assert not any(w.is_alive() for w in data_iter._workers), "workers outlived end_loader_workers"
    cycle = [data_iter]
    cycle.append(cycle)  # only the collector, which is off, could free the iterator
    print("workers", len(data_iter._workers), flush=True)
""")


def _exits(code: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("end_now", [False, True])
def test_a_process_holding_a_training_iterator_at_exit_still_exits(end_now):
    done = _exits(CHILD.format(opener="open_training_iter", end_now=end_now))
    assert done is not None, f"the interpreter waited on its loader workers for {EXIT_SECONDS} s at exit"
    assert done.returncode == 0 and "workers 2" in done.stdout, done.stderr[-2000:]


def test_without_the_exit_hook_such_a_process_hangs():
    """The control: the same iterator opened with plain iter() is not ended at exit, and the
    interpreter waits on workers that ignore the SIGTERM it sends them."""
    code = CHILD.format(opener="iter", end_now=False)
    try:  # no pipes: the orphaned workers would hold them open after the child is killed
        subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except subprocess.TimeoutExpired:
        return
    pytest.fail("an iterator not known to the exit hook was still ended: the control no longer shows the hang")


class _SlowAfterFirst:
    """Item 0 at once, every later item after a long read: a worker busy prefetching."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import time

        if i:
            time.sleep(60)
        return i


def test_a_worker_still_reading_is_ended_too():
    """The loader gives a worker a few seconds to stop, then sends the SIGTERM these workers
    ignore: one still in a slow read must not outlive end_loader_workers."""
    import time

    from torch.utils.data import DataLoader

    from predet.engine.preemption import end_loader_workers, ignore_stop_signals, open_training_iter

    loader = DataLoader(_SlowAfterFirst(), batch_size=1, num_workers=1, worker_init_fn=ignore_stop_signals)
    data_iter = open_training_iter(loader)
    assert next(data_iter).tolist() == [0]
    start = time.monotonic()
    end_loader_workers(data_iter)
    assert not any(w.is_alive() for w in data_iter._workers)
    assert time.monotonic() - start < 30


def test_a_loader_with_persistent_workers_goes_on_into_its_next_epoch(tmp_path):
    """The trainer restarts an exhausted loader with iter() again; persistent workers are reused
    then, so the trainer must not have ended them."""
    from toy_training import make_batch, new_model, solver_cfg, train_cfg
    from torch.utils.data import DataLoader

    from predet.engine.preemption import ignore_stop_signals
    from predet.engine.trainer import train

    batches = [make_batch(i) for i in range(4)]
    loader = DataLoader(batches, batch_size=None, num_workers=1, persistent_workers=True,
                        worker_init_fn=ignore_stop_signals)
    result = train(new_model(), lambda start: loader, solver_cfg(max_iters=10, milestones=[6, 8]),
                   train_cfg(tmp_path))
    assert result.iteration == 10


def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_final_weights(tmp_path):
    """Killed between the last checkpoint and model_final.pth: the resume finds the run finished
    and must still write model_final.pth (it used to return without it)."""
    from toy_training import make_loader, new_model, solver_cfg, train_cfg

    from predet.checkpoint.io import load_checkpoint
    from predet.engine.trainer import train

    cfg = train_cfg(tmp_path)
    train(new_model(), make_loader, solver_cfg(), cfg)
    final = tmp_path / "run" / "checkpoints" / "model_final.pth"
    weights = load_checkpoint(final)["model"]
    final.unlink()
    from dataclasses import replace

    train(new_model(), make_loader, solver_cfg(), replace(cfg, resume=True))
    again = load_checkpoint(final)["model"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)
