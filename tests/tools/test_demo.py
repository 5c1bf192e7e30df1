"""The demo pipeline in its tiny mode: every step runs, the table and the payoff beside its noise
are printed."""

import json
import statistics

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
    assert f"PreDet {mean:.1f} ± {std:.1f}" in box and "noise (2 std)" in box
    assert "mean ± sample std over 2 fine-tuning seeds" in printed
    assert (out / "report" / "payoff.txt").read_text().strip() in printed
    # Run again: every step is found finished and nothing is redone.
    mtime = (out / "finetune" / "scratch" / "base" / "seed1" / "results.json").stat().st_mtime
    assert cli_main(["demo", "--size", "tiny", "--data", str(fashiondet_tiny), "--out", str(out), "--no-progress"]) == 0
    assert (out / "finetune" / "scratch" / "base" / "seed1" / "results.json").stat().st_mtime == mtime
