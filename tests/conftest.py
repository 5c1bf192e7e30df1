import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def fashiondet_tiny(tmp_path_factory) -> Path:
    """A tiny FashionDet build (weak set + detection splits), made once per test session."""
    from predet.data.fashiondet import build_fashiondet

    out = tmp_path_factory.mktemp("fashiondet_tiny")
    build_fashiondet(out, size="tiny", seed=0, canvas=96, progress=False)
    return out


@pytest.fixture(scope="session")
def pretrain_checkpoint(fashiondet_tiny, tmp_path_factory) -> Path:
    """A few iterations of tiny PreDet pre-training: a real checkpoint to fine-tune from."""
    from helpers import tiny_pretrain_config

    from predet.pretrain import pretrain

    run = tmp_path_factory.mktemp("pretrain_run")
    result = pretrain(tiny_pretrain_config(fashiondet_tiny / "weak", run, 3))
    return run / "checkpoints" / "model_final.pth"


def pytest_sessionfinish(session, exitstatus):
    """A worker process left running fails the session instead of hanging it: Python's exit ends
    leftover multiprocessing children with SIGTERM and waits for them, and training-loader
    workers ignore SIGTERM (the CI run that never finished waited on two of them)."""
    import multiprocessing
    import os
    import signal
    import time

    deadline = time.monotonic() + 15  # workers a loader is shutting down get time to go
    while (left := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(left)} worker process(es) outlived the tests: {left}"
    if reporter is not None:
        reporter.write_sep("=", message, red=True)
    for process in left:
        os.kill(process.pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    """In CI, anything else that keeps the interpreter from exiting (a non-daemon thread, a child
    it waits on) prints every thread's stack and fails the run after two minutes, instead of
    holding CI until its own time-out with nothing to show. (Not elsewhere: an in-process
    ``pytest.main()`` would be ended two minutes later.)"""
    import faulthandler
    import os

    if os.environ.get("CI"):
        faulthandler.dump_traceback_later(120, exit=True)
