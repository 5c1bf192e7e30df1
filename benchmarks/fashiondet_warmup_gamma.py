"""The FashionDet ladder's warm-up and gamma check, one seed on val beside each chosen lr.

Warm-up x12 (40 instead of 3 iterations at the benchmark's 1x) and gamma 0.3 (instead of 0.1),
for scratch (lr 0.04) and PreDet (lr 0.02), with the ladder's own data overrides, cuts and
PreDet checkpoint; two runs side by side, one thread each. Finished runs are skipped. Usage:
    python benchmarks/fashiondet_warmup_gamma.py [--out runs/bench_ladder]
Results: OUT/extra/<init>_<key>/.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashiondet_benchmark as ladder  # noqa: E402
from predet.sweep import sweep  # noqa: E402

CHECKS = {"solver.warmup_iters": [12000], "solver.gamma": [0.3]}
CHOSEN_LR = {"scratch": 0.04, "predet": 0.02}  # the ladder's choices on val (selection_*_1x.json)


def check_task(out: Path, name: str, init: str, key: str, base: list[str]):
    def task():
        sweep(ladder.FINETUNE_CONFIG, {key: CHECKS[key]}, seeds=1, out_dir=out / "extra" / f"{name}_{key}",
              threads=1, echo=ladder._echo(f"{name} {key}"),
              overrides=[f"init={init}", f"solver.lr={CHOSEN_LR[name]}", "schedule=1x", "train.eval_period=0", *base])
    return task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_ladder", help="the ladder's run folder")
    parser.add_argument("--data", default="data/fashiondet")
    args = parser.parse_args(argv)
    out = Path(args.out)
    inits = ladder.initialisations(out, ["predet"])
    base = ladder.data_overrides(Path(args.data)) + ladder.FINETUNE_CUTS
    jobs = [ladder.Job(f"{name} {key}", check_task(out, name, inits[name], key, base))
            for key in CHECKS for name in CHOSEN_LR]
    ladder.run_jobs(jobs, lanes=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
