"""The ``predet`` command: one verb per pipeline step, each a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from predet.config import ConfigError
from predet.errors import Preempted


def _main_process() -> bool:
    """Rank 0 under torchrun (read from its environment: the group is gone once a verb returns)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file, or a shipped config by name, e.g. finetune/fashiondet_r18_cpu")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. solver.lr=0.01")


def _add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def print_config(cfg, solver, scaled_by: str) -> None:
    """The config a run would use (file + preset + overrides), as YAML it can be re-run from,
    and what its solver resolves to at the real total batch (rank 0 of a launched group prints)."""
    import yaml

    from predet.config import to_dict
    from predet.engine.distributed import get_world_size

    if not _main_process():
        return
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    world = get_world_size()
    batch = f"batch {cfg.train.batch_size * world} ({cfg.train.batch_size} per process x {world} process" \
            f"{'es' if world > 1 else ''})"
    if solver != cfg.solver:
        solved = ", ".join(f"{k}={v}" for k, v in to_dict(solver).items() if getattr(cfg.solver, k) != v)
        print(f"# {scaled_by} at {batch} runs: {solved}")
    else:
        print(f"# runs the solver as given, at {batch}")


def cmd_pretrain(args) -> None:
    from predet.engine.launch import launched
    from predet.pretrain import load_pretrain_config, pretrain, resolve_solver

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        with launched(cfg.train.device):
            return print_config(cfg, resolve_solver(cfg), f"reference_batch={cfg.reference_batch}")
    result = pretrain(cfg)
    if not _main_process():
        return
    print(f"pre-training finished at iteration {result.iteration}; checkpoint: {result.last_checkpoint}")
    if result.skipped:
        print(f"{result.skipped} image(s) could not be read and were skipped: see {result.run_dir / 'skipped.jsonl'}")


def cmd_finetune(args) -> None:
    from predet.engine.launch import launched
    from predet.finetune import (
        finetune,
        load_finetune_config,
        resolve_solver,
        resolved_config,
    )

    cfg = load_finetune_config(args.config, args.overrides)
    if args.print_config:
        with launched(cfg.train.device):
            resolved = resolved_config(cfg)
            return print_config(resolved, resolve_solver(resolved), f"schedule={cfg.schedule}")
    out = finetune(cfg)
    if not _main_process():
        return
    print(f"fine-tuning finished at iteration {out.train.iteration}; results: {out.results_path}")
    for split in ("val", "test"):
        if split in out.results:
            print(f"{split}: " + format_metrics(out.results[split]))


def cmd_eval(args) -> None:
    from predet.evaluation.coco import format_per_category
    from predet.evaluation.evaluate import evaluate_checkpoint

    evaluation = evaluate_checkpoint(args.checkpoint, args.data, args.images, args.kind, args.device,
                                     args.batch_size, args.visualize, args.out, args.num_workers)
    if _main_process():
        print(format_metrics(evaluation.metrics))
        print(format_per_category(evaluation.per_category))


def cmd_predict(args) -> None:
    from predet.evaluation.predict import predict

    out = predict(args.checkpoint, args.images, args.out, args.score_thresh, args.image_root, args.device,
                  args.batch_size, args.visualize, progress=not args.no_progress, num_workers=args.num_workers)
    if _main_process():
        print(f"{out.detections} detections on {out.images} images: {out.results_path} "
              f"(images: {out.image_info_path})")
        if out.drawings:
            print(f"drawings: {out.drawings[0].parent}")


def cmd_export(args) -> None:
    from predet.checkpoint.export import export_checkpoint

    for path in export_checkpoint(args.checkpoint, args.out, formats=args.format, arch=args.arch):
        print(f"wrote {path}")


def cmd_demo(args) -> None:
    from predet.tools.demo import run_demo

    result = run_demo(args.out, args.data, args.size, args.seed, progress=not args.no_progress)
    print(result.table)
    print(result.payoff)
    print(f"AP against fine-tuning iterations: {result.plot}")


def format_metrics(metrics: dict) -> str:
    """AP figures in percent, as papers print them."""
    keys = [k for k in metrics if "/AP" in k]
    # COCOeval's -1: no ground truth of that size (or frequency) in the split, not an AP
    return "  ".join(f"{k} {100 * metrics[k]:.1f}" if metrics[k] >= 0 else f"{k} n/a" for k in keys)


def cmd_data_fashiondet(args) -> int:
    from predet.data.fashiondet import main_from_args

    return main_from_args(args)


def cmd_data_shards(args) -> None:
    from predet.data.shards import write_webdataset_shards

    paths = write_webdataset_shards(args.labels, args.out, shard_size=args.shard_size)
    print(f"wrote {len(paths)} shard(s) to {args.out}")


def cmd_sweep(args) -> int:
    from predet.tools.sweep.grid import parse_grid_args
    from predet.tools.sweep.run import sweep

    common = dict(seeds=args.seeds, metric=args.metric, out_dir=args.out, overrides=args.overrides,
                  launcher=args.launcher, nproc=args.nproc, slurm_partition=args.slurm_partition,
                  slurm_time=args.slurm_time, gpus_per_node=args.gpus_per_node, jobs=args.jobs,
                  threads=args.threads, retry_failed=args.retry_failed)
    if args.rung_val_subset and args.search != "halving":
        raise ConfigError("--rung-val-subset scores a halving search's short rungs; add --search halving")
    if args.search == "halving":
        from predet.tools.sweep.halving import halving

        record = halving(args.config, parse_grid_args(args.grid), eta=args.eta, rungs=args.rungs,
                         val_subset=args.rung_val_subset, **common)
        return 0 if record.get("best") else 1
    summary = sweep(args.config, parse_grid_args(args.grid), **common)
    return 1 if any(r["status"] == "failed" for r in summary["runs"]) else 0


def cmd_report(args) -> int:
    from pathlib import Path

    from predet.tools.report import paper_report, parse_labels, write_report

    if args.paper:
        print(paper_report())
    if not args.dirs:
        if args.paper:
            return 0
        raise ConfigError("give the run or sweep folders to report on (or --paper)")
    out = args.out or str(Path(args.dirs[0]) / "report")
    try:
        written = write_report(args.dirs, out, split=args.metric_split, labels=parse_labels(args.label))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(written["text"])
    for path in [written["markdown"], written["csv"], written["per_category"], *written["plots"]]:
        if path is None:
            continue
        print(f"wrote {path}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line naming the verb (argparse prints the usage first), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low: float, allowed: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= low or value != value or value in (float("inf"),):
            raise argparse.ArgumentTypeError(f"{text}: must be {allowed}")
        return value

    return parse


positive_int = _number(int, 1, "a positive integer")
non_negative_int = _number(int, 0, "an integer >= 0")


def score_threshold(text: str) -> float:
    value = _number(float, 0.0, "a score in [0, 1]")(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a score in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="predet", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=OneLineParser)

    p = verbs.add_parser("pretrain", help="PreDet pre-training on weakly labelled images")
    _add_config_args(p)
    _add_print_config(p)
    p.set_defaults(func=cmd_pretrain)

    p = verbs.add_parser("finetune", help="fine-tune a detector (Mask/Faster R-CNN, RetinaNet) and evaluate it")
    _add_config_args(p)
    _add_print_config(p)
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser("eval", help="evaluate a fine-tuned checkpoint on a COCO or LVIS json")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="COCO or LVIS annotation json")
    p.add_argument("--images", default="", help="image folder (default: the checkpoint's val_images)")
    p.add_argument("--kind", default="", choices=["", "coco", "lvis"], help="default: the checkpoint's")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per batch (per process under torchrun)")
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="loader workers per process")
    p.add_argument("--visualize", type=non_negative_int, default=0, metavar="N", help="write N PNGs of predictions")
    p.add_argument("--out", default=None, help="output folder (default: beside the checkpoint)")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("predict", help="detections for unlabelled images as a COCO results file")
    p.add_argument("--checkpoint", required=True, help="a predet finetune checkpoint")
    p.add_argument("--images", required=True, help="an image folder, or a COCO image-info json (e.g. test-dev)")
    p.add_argument("--image-root", default=None, help="folder of an image-info json's file names (default: its folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-thresh", type=score_threshold, default=None, help="keep detections scoring at least this "
                   "(default: the checkpoint's model.score_thresh)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per batch (per process under torchrun)")
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="loader workers per process")
    p.add_argument("--visualize", type=non_negative_int, default=0, metavar="N", help="draw the first N images' detections")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = verbs.add_parser("export", help="export weights for plain torchvision and for Detectron2")
    p.add_argument("--checkpoint", required=True, help="a pretrain or finetune checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", nargs="+", default=["torchvision", "detectron2"],
                   choices=["torchvision", "detectron2"])
    p.add_argument("--arch", default="mask_rcnn", choices=["mask_rcnn", "faster_rcnn", "retinanet"],
                   help="detector layout for a pre-training checkpoint")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("sweep", help="grid search of fine-tuning settings x seeds; resumable; best setting on val",
                         description="Fine-tune + evaluate every grid point x seed, each in OUT/<settings>/seed<k>. "
                                     "Put key=value overrides for every run before --grid or after '--'.")
    _add_config_args(p)
    p.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2|NAME",
                   help="lr, gamma, lr_mf, schedule, init, wd or any dotted key; or a named grid "
                        "of the supplement: table1, small_data")
    p.add_argument("--seeds", type=positive_int, default=3, help="runs per grid point (train.seed 0..N-1)")
    p.add_argument("--metric", default="bbox/AP", help="validation metric that picks the best setting")
    p.add_argument("--out", default="runs/sweep", help="sweep folder")
    p.add_argument("--launcher", default="local", choices=["local", "torchrun", "submitit"])
    p.add_argument("--nproc", type=positive_int, default=1, help="processes (GPUs) per run with torchrun")
    p.add_argument("--jobs", type=positive_int, default=1, help="local: runs side by side (CPU machines)")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="local: CPU threads per run (default: all, or the cores shared out among --jobs)")
    p.add_argument("--slurm-partition", default="", help="submitit: SLURM partition")
    p.add_argument("--slurm-time", type=positive_int, default=1440, help="submitit: time limit per run, minutes")
    p.add_argument("--gpus-per-node", type=positive_int, default=1, help="submitit: GPUs (and processes) per run")
    p.add_argument("--search", default="grid", choices=["grid", "halving"],
                   help="grid: every point x --seeds; halving: successive halving, --seeds for the winner only")
    p.add_argument("--eta", type=positive_int, default=3, help="halving: keep 1/eta of the points per rung")
    p.add_argument("--rungs", type=positive_int, default=3, help="halving: budgets eta^-(rungs-1) .. 1 of the schedule")
    p.add_argument("--rung-val-subset", type=non_negative_int, default=0, metavar="N",
                   help="halving: score the rungs below the full budget on a fixed N-image subset of data.val (0: all)")
    p.add_argument("--retry-failed", action="store_true",
                   help="relaunch runs that failed on their inputs (exit 2); killed runs are always retried")
    p.set_defaults(func=cmd_sweep)

    p = verbs.add_parser("report", help="tables (as the supplement's Tables 3/4) and AP curves from run folders")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="run or sweep folders (searched recursively)")
    p.add_argument("--out", default=None, help="output folder (default: DIR/report of the first DIR)")
    p.add_argument("--metric-split", default="test", choices=["test", "val"], help="split the table shows")
    p.add_argument("--label", action="append", default=[], metavar="DIR=NAME",
                   help="pre-training name for the runs under DIR (or with init DIR); repeatable")
    p.add_argument("--paper", action="store_true", help="print the supplement's Tables 3 and 4")
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser("demo", help="FashionDet end to end on a CPU: data, pre-training, fine-tuning, table")
    p.add_argument("--size", default="small", choices=["tiny", "small"], help="tiny: a smoke test in a minute")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--data", default="data/fashiondet", help="FashionDet folder (built when missing)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    data = verbs.add_parser("data", help="prepare data sets")
    kinds = data.add_subparsers(dest="kind", required=True)
    from predet.data.fashiondet import add_cli_arguments

    p = kinds.add_parser("fashiondet", help="build the FashionDet benchmark (weak set + detection set)")
    add_cli_arguments(p)
    p.set_defaults(func=cmd_data_fashiondet)
    p = kinds.add_parser("shards", help="convert a folder + labels.jsonl set into WebDataset tar shards")
    p.add_argument("--labels", required=True, help="labels.jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard")
    p.set_defaults(func=cmd_data_shards)
    return parser


def setup_logging() -> None:
    """Info from the main process only; other ranks speak up for warnings."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def user_error_line(exc: BaseException) -> str | None:
    """The one line a user mistake prints (cause and fix), or None for a bug (traceback)."""
    from predet.data.fashion_mnist import FashionMNISTNotFound
    from predet.errors import UserError, disk_full, is_disk_full

    if is_disk_full(exc) and not isinstance(exc, UserError):
        exc = disk_full(getattr(exc, "filename", None) or "an output file")
    if not isinstance(exc, (UserError, FashionMNISTNotFound, FloatingPointError)):
        return None
    return "; ".join(part.strip() for part in _worker_message(str(exc)).splitlines() if part.strip())


def _worker_message(text: str) -> str:
    """An error raised in a DataLoader worker comes back with the worker's traceback as its
    message ("Caught ConfigError in DataLoader worker process 0. Original Traceback ..."): the
    user's message is the traceback's last entry, after its ``module.Class: `` prefix."""
    if not (text.startswith("Caught ") and "DataLoader worker" in text and "Original Traceback" in text):
        return text
    lines = text.rstrip().splitlines()
    last_frame = max(i for i, line in enumerate(lines) if line.startswith("  "))
    first, *rest = lines[last_frame + 1:] or [text]
    return "\n".join([first.split(": ", 1)[1] if ": " in first else first, *rest])


# Verbs whose library call tries its own output folder (train.run_dir, or --out before inference).
CHECK_OWN_OUTPUT = ("pretrain", "finetune", "eval", "predict", "export")


def _check_outputs(args) -> None:
    """Every output folder the other verbs name on their command line, tried for writing before
    any work."""
    from predet.engine.runfolder import check_writable

    if args.verb in CHECK_OWN_OUTPUT:
        return
    for option in ("out", "data"):
        value = getattr(args, option, None)
        if isinstance(value, str) and value and (option == "out" or args.verb == "demo"):
            check_writable(value, f"--{option}")


def _say(line: str) -> None:
    """One line to stderr in one write: under torchrun every rank shares the stream, and a
    line written in pieces can be cut by another rank's."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured or replaced stream: no descriptor
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return
    os.write(fd, (line + "\n").encode(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        _check_outputs(args)
        return args.func(args) or 0
    except Preempted as exc:  # a checkpoint is on disk: one line, exit 128 + the signal
        if _main_process():
            _say(f"predet {args.verb}: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (data building, evaluation)
        _say(f"predet {args.verb}: interrupted")
        return 130
    except Exception as exc:
        line = user_error_line(exc)
        if line is None:
            raise
        rank = "" if _main_process() else f"rank {os.environ['RANK']}: "  # under torchrun: which process
        _say(f"predet {args.verb}: error: {rank}{line}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
