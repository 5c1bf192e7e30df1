"""Training-loader workers ignore SIGTERM, so Python's exit cannot end them: a process that
still holds such an iterator at exit (a failed run's traceback in a reference cycle) must not
wait on them forever. Each case runs in its own interpreter with the garbage collector off, so
nothing but our code can end the workers before exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
