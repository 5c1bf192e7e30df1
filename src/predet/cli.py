"""The ``predet`` command: one verb per pipeline step, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys

from predet.config import ConfigError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. solver.lr=0.01")


def cmd_pretrain(args) -> None:
    from predet.pretrain import load_pretrain_config, pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    result = pretrain(cfg)
    print(f"pre-training finished at iteration {result.iteration}; checkpoint: {result.last_checkpoint}")
    if result.skipped:
        print(f"{result.skipped} image(s) could not be read and were skipped: see {result.run_dir / 'skipped.jsonl'}")


def cmd_data_fashiondet(args) -> int:
    from predet.data.fashiondet import main_from_args

    return main_from_args(args)


def cmd_data_shards(args) -> None:
    from predet.data.weak import write_webdataset_shards

    paths = write_webdataset_shards(args.labels, args.out, shard_size=args.shard_size)
    print(f"wrote {len(paths)} shard(s) to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="predet", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("pretrain", help="PreDet pre-training on weakly labelled images")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    data = verbs.add_parser("data", help="prepare data sets")
    kinds = data.add_subparsers(dest="kind", required=True)
    from predet.data.fashiondet import add_cli_arguments

    p = kinds.add_parser("fashiondet", help="build the FashionDet benchmark (weak set + detection set)")
    add_cli_arguments(p)
    p.set_defaults(func=cmd_data_fashiondet)
    p = kinds.add_parser("shards", help="convert a folder + labels.jsonl set into WebDataset tar shards")
    p.add_argument("--labels", required=True, help="labels.jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.set_defaults(func=cmd_data_shards)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from predet.data.fashion_mnist import FashionMNISTNotFound
    from predet.data.weak import LabelFileError
    from predet.engine.trainer import ResumeError

    try:
        return args.func(args) or 0
    except (ConfigError, LabelFileError, FashionMNISTNotFound, FloatingPointError, ResumeError) as exc:
        print(f"predet {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
