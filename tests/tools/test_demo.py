"""The demo pipeline in its tiny mode: every step runs, the table and the payoff beside its noise
are printed."""

import json
import statistics

import pytest
import yaml

from predet.cli import main as cli_main


def test_tiny_demo_runs_end_to_end_and_prints_the_table(fashiondet_tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--size", "tiny", "--data", str(fashiondet_tiny), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "PreDet" in printed and "scratch" in printed
    assert "AP against fine-tuning iterations:" in printed
    plot = printed.strip().splitlines()[-1].split(": ", 1)[1]
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # two fine-tuning seeds per initialisation, and the gap printed beside their noise
    values = {}
    for name in ("predet", "scratch"):
        for seed in (0, 1):
            run = out / "finetune" / name / "base" / f"seed{seed}"
            results = json.loads((run / "results.json").read_text())
            assert "bbox/AP" in results["val"] and "segm/AP" in results["val"]
            assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
            values.setdefault(name, []).append(100 * results["val"]["bbox/AP"])
    predet = json.loads((out / "finetune" / "predet" / "base" / "seed0" / "init_report.json").read_text())
    assert len(predet["loaded"]) > 50
    box = next(line for line in printed.splitlines() if line.strip().startswith("box AP"))
    mean, std = statistics.fmean(values["predet"]), statistics.stdev(values["predet"])
    gap = mean - statistics.fmean(values["scratch"])
    se = (std ** 2 / 2 + statistics.stdev(values["scratch"]) ** 2 / 2) ** 0.5
    assert f"PreDet {mean:.1f} ± {std:.1f}" in box and f"gap {gap:+.1f} ± {se:.1f}" in box
    assert "over 2 fine-tuning seeds each" in printed
    assert (out / "report" / "payoff.txt").read_text().strip() in printed
    # Run again: every step is found finished and nothing is redone.
    mtime = (out / "finetune" / "scratch" / "base" / "seed1" / "results.json").stat().st_mtime
    assert cli_main(["demo", "--size", "tiny", "--data", str(fashiondet_tiny), "--out", str(out), "--no-progress"]) == 0
    assert (out / "finetune" / "scratch" / "base" / "seed1" / "results.json").stat().st_mtime == mtime


def test_the_gap_of_means_is_judged_against_its_standard_error():
    from predet.tools.stats import mean_gap, seed_gap

    a, b = {"mean": 10.8, "std": 1.8, "n": 4}, {"mean": 7.3, "std": 0.9, "n": 4}
    gap = mean_gap(a, b)
    assert gap["se"] == pytest.approx((1.8 ** 2 / 4 + 0.9 ** 2 / 4) ** 0.5) and gap["wins_by_2se"]
    assert not seed_gap(a, b)["wins_by_2std"]  # the per-run rule: one run need not beat one run
    many = mean_gap({**a, "n": 400}, {**b, "n": 400})
    assert many["se"] < gap["se"] / 5  # more seeds, less noise in the gap
    assert not mean_gap({"mean": 8.0, "std": 1.8, "n": 4}, b)["wins_by_2se"]
    assert mean_gap(a, {"mean": 7.3, "std": None, "n": 1}) is None
