"""The demo pipeline in its tiny mode: every step runs and the table is printed."""

import json

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
    for name in ("predet", "scratch"):
        results = json.loads((out / "finetune" / name / "results.json").read_text())
        assert "bbox/AP" in results["val"] and "segm/AP" in results["val"]
    predet = json.loads((out / "finetune" / "predet" / "init_report.json").read_text())
    assert len(predet["loaded"]) > 50
    # Run again: every step is found finished and nothing is redone.
    mtime = (out / "finetune" / "scratch" / "results.json").stat().st_mtime
    assert cli_main(["demo", "--size", "tiny", "--data", str(fashiondet_tiny), "--out", str(out), "--no-progress"]) == 0
    assert (out / "finetune" / "scratch" / "results.json").stat().st_mtime == mtime
