"""The FashionDet scale-curve benchmark: its plan, its fit, and its report of finished points."""

import json
import math
from pathlib import Path

import pytest
from helpers import load_benchmarks


@pytest.fixture
def scale(monkeypatch):
    return load_benchmarks(monkeypatch, "fashiondet_benchmark", "fashiondet_scale")


def write_summary(path: Path, box: list[float], mask: list[float], seconds: float) -> Path:
    def stat(values):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        return {"mean": mean, "std": std, "n": len(values)}

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": [{"test": {"bbox/AP": stat(box), "segm/AP": stat(mask)}}],
                                "runs": [{"seconds": seconds / len(box)} for _ in box]}))
    return path


def test_plan_puts_the_costliest_pretraining_first_and_seeds_the_chosen_budgets(scale):
    points = scale.plan(["cls_only", "predet"], [200, 1600, 400], seeded=[1600], seeds=3)
    assert points[:2] == [("predet", 1600, 3), ("cls_only", 1600, 3)]
    assert {(v, b): s for v, b, s in points}[("predet", 200)] == 1
    jobs = scale.jobs_for(Path("out"), Path("data"), points, {"solver.lr": 0.04}, [])
    names = [j.name for j in jobs]
    assert names.index("pretrain predet 1600") < names.index("pretrain predet 200")
    finetune = next(j for j in jobs if j.name == "finetune predet 400")
    assert finetune.after == ["pretrain predet 400"]


def test_log2_fit_and_where_it_meets_a_line(scale):
    rows = [{"images_seen": 2 ** k, "test": {"bbox/AP": {"mean": 0.01 * k}}} for k in (10, 11, 13)]
    fit = scale.fit_log2(rows, "bbox/AP")
    assert fit["per_doubling"] == pytest.approx(0.01) and fit["intercept"] == pytest.approx(0.0, abs=1e-12)
    where = scale.meets(fit, 0.15)  # 0.15 = 0.01 * log2(images): 2**15 images
    assert where["images_seen"] == pytest.approx(2 ** 15)
    assert scale.meets({"per_doubling": -0.01, "intercept": 1.0}, 0.15) is None  # a falling line never meets it
    assert scale.fit_log2(rows[:1], "bbox/AP") is None


def test_report_of_finished_points_names_the_missing_ones(scale, tmp_path):
    out = tmp_path / "runs"
    points = scale.plan(["predet"], [200, 400], seeded=[400], seeds=2)
    write_summary(out / "iters400" / "final" / "predet_1x" / "summary.json", [0.10, 0.12], [0.09, 0.11], 600)
    (out / "iters400" / "pretrain" / "predet").mkdir(parents=True)
    (out / "iters400" / "pretrain" / "predet" / "timing.json").write_text(json.dumps({"seconds": 1200}))
    ladder_point = write_summary(tmp_path / "ladder" / "summary.json", [0.13, 0.12, 0.14], [0.1, 0.1, 0.1], 0)
    rows, missing = scale.collect(out, points, [f"predet:800:{ladder_point}"])
    assert missing == ["predet 200"]
    assert [r["iterations"] for r in rows] == [400, 800]
    assert rows[0]["pretrain_lane_minutes"] == 20.0 and rows[0]["finetune_lane_minutes"] == 10.0
    assert rows[0]["images_seen"] == 400 * 32
    scratch = {"1x": {"bbox/AP": {"mean": 0.07, "std": 0.007, "n": 3}, "segm/AP": {"mean": 0.07, "std": None, "n": 3}},
               "3x": {"bbox/AP": {"mean": 0.21, "std": None, "n": 1}, "segm/AP": {"mean": 0.2, "std": None, "n": 1}}}
    analysis = scale.analyse(rows, scratch)
    box = analysis["bbox/AP"]["predet"]
    assert box["largest_budget"] == 800 and box["gap_to_scratch_3x_at_largest"] == pytest.approx(0.13 - 0.21)
    assert box["fit"]["per_doubling"] == pytest.approx(0.13 - 0.11)
    scale.write_markdown(rows, scratch, analysis, tmp_path / "scale.md", "cmd", missing)
    text = (tmp_path / "scale.md").read_text()
    assert "Not run yet: predet 200." in text and "13.0 ± 1.0 (n=3)" in text
    scale.plot(rows, scratch, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 1000
