"""How a sweep's runs are started: one process each on this machine (optionally several side by
side, a few threads each), under torchrun, or as SLURM jobs through submitit. A run's process
dies with the sweep that launched it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from predet.config import ConfigError
from predet.engine.processes import die_with_parent, thread_env
from predet.tools.sweep.grid import run_overrides

LAUNCHERS = ("local", "torchrun", "submitit")

ERROR_TAIL_LINES = 20


def finetune_command(config: str | Path | None, overrides: list[str], launcher: str = "local",
                     nproc: int = 1) -> list[str]:
    """The argv of one run: ``python -m predet finetune`` or the same under torchrun.

    torchrun is invoked as ``python -m torch.distributed.run`` (what the ``torchrun`` script
    runs) so the sweep's own interpreter and environment are used; ``--standalone`` picks a
    free rendezvous port, so runs one after another never collide.
    """
    args = ["finetune"] + (["--config", str(config)] if config else []) + list(overrides)
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(int(nproc)), "-m", "predet", *args]
    return [sys.executable, "-m", "predet", *args]


def _tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    """The last lines of a log, each reduced to what a progress bar left visible (after \\r)."""
    kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in kept if line.strip()][-lines:])


INTERRUPT_GRACE_SECONDS = 300  # a step and a checkpoint write of a large model, with room


def wait_through_ctrl_c(process: subprocess.Popen) -> int:
    """The run's exit code. On Ctrl-C, which reached the run too (one process group), the run
    gets time to finish its step and write its checkpoint before the interrupt goes on
    (``subprocess.call`` would kill it after a quarter of a second); a second Ctrl-C kills it."""
    try:
        return process.wait()
    except KeyboardInterrupt:
        try:
            process.wait(timeout=INTERRUPT_GRACE_SECONDS)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            pass
        if process.poll() is None:
            process.kill()
            process.wait()
        raise


def run_command(cmd: list[str], log_path: str | Path, env: dict | None = None) -> dict:
    """Run one process with stdout+stderr appended to ``log_path``; never raises for its failure.

    Returns ``{"returncode", "seconds", "error"}`` where ``error`` is the tail of this
    attempt's log when the process failed. Module-level so submitit can pickle it into a job.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "ab") as log:
        offset = log.tell()
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=die_with_parent if sys.platform == "linux" else None)
        except OSError as exc:  # the executable itself is missing
            log.write(f"{exc}\n".encode())
            code = 127
        else:
            code = wait_through_ctrl_c(process)
    seconds = time.time() - start
    error = ""
    if code != 0:
        with open(log_path, "rb") as log:
            log.seek(offset)
            error = _tail(log.read().decode(errors="replace"))
    return {"returncode": code, "seconds": seconds, "error": error}


def launch_local(config, overrides: list[str], run_dir: str | Path, threads: int = 0) -> dict:
    """One run on this machine, one process: ``python -m predet finetune ...``."""
    return run_command(finetune_command(config, overrides, "local"), Path(run_dir) / "log.txt", thread_env(threads))


def launch_torchrun(config, overrides: list[str], run_dir: str | Path, nproc: int = 1) -> dict:
    """One run on this machine, ``nproc`` processes (one per GPU) under torchrun."""
    return run_command(finetune_command(config, overrides, "torchrun", nproc), Path(run_dir) / "log.txt")


def submit_submitit(cmds: list[list[str]], run_dirs: list[Path], folder: str | Path,
                    slurm_partition: str = "", slurm_time: int = 1440, gpus_per_node: int = 1) -> list:
    """Submit each command as a one-node SLURM job through submitit; returns the jobs.

    Each job runs ``run_command`` on its node (same log.txt as a local run), so the sweep's
    interpreter must be reachable from the nodes (a shared file system), as usual with submitit.
    """
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher submitit needs the submitit package: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=str(folder))
    params = {"timeout_min": int(slurm_time), "gpus_per_node": int(gpus_per_node), "nodes": 1,
              "tasks_per_node": 1, "name": "predet-sweep"}
    if slurm_partition:
        params["slurm_partition"] = slurm_partition
    executor.update_parameters(**params)
    return [executor.submit(run_command, cmd, Path(d) / "log.txt") for cmd, d in zip(cmds, run_dirs)]


def wait_submitit(job) -> dict:
    """Block until ``job`` ends; a job SLURM killed (time limit, node failure) is a failed run."""
    try:
        return job.result()
    except Exception as exc:  # submitit raises its own error types for jobs that did not finish
        return {"returncode": None, "seconds": None, "error": _tail(f"{type(exc).__name__}: {exc}")}


def side_by_side(calls: list, jobs: int):
    """The results of ``calls``, in order, ``jobs`` of them running at once. Closing the
    generator (the sweep stopped: Ctrl-C, an error) starts no further call; those running end
    on their own (a Ctrl-C reaches their processes too)."""
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(call) for call in calls]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def launch_all(pending: list[dict], config, overrides: list[str], launcher: str, nproc: int,
                out_dir: Path, echo, opts: dict):
    """The launcher outcomes of ``pending``, in order, each as soon as it is known."""
    def args(row):
        return run_overrides(row, overrides, resume=row["resumed_from"] is not None)

    if launcher == "local":
        jobs, threads = int(opts.get("jobs", 1)), int(opts.get("threads", 0))
        if jobs > 1:
            threads = threads or max(1, (os.cpu_count() or jobs) // jobs)
            return side_by_side([lambda r=r: launch_local(config, args(r), r["run_dir"], threads) for r in pending], jobs)
        return (launch_local(config, args(r), r["run_dir"], threads) for r in pending)
    if launcher == "torchrun":
        return (launch_torchrun(config, args(r), r["run_dir"], nproc) for r in pending)
    gpus = int(opts.get("gpus_per_node", 1))
    procs = max(int(nproc), gpus)  # one process per GPU of the job's node
    cmds = [finetune_command(config, args(r), "torchrun" if procs > 1 else "local", procs) for r in pending]
    jobs = submit_submitit(cmds, [Path(r["run_dir"]) for r in pending], opts.get("folder") or out_dir / ".submitit",
                           opts.get("slurm_partition", ""), opts.get("slurm_time", 1440), gpus)
    for row, job in zip(pending, jobs):
        row.update(status="submitted", job_id=str(getattr(job, "job_id", "")))
    if jobs:
        echo(f"submitted {len(jobs)} SLURM job(s): {', '.join(r['job_id'] for r in pending)}; waiting")
    return (wait_submitit(job) for job in jobs)
