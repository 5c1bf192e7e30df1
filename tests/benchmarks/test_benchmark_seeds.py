"""The FashionDet seeds benchmark: its job order, pooled statistics, time to accuracy and report."""

import json
import statistics
from pathlib import Path

import pytest
from helpers import load_benchmarks


@pytest.fixture
def seeds(monkeypatch):
    return load_benchmarks(monkeypatch, "fashiondet_benchmark", "fashiondet_seeds")


def write_sweep(folder: Path, box: list[float], curves: list[list[tuple[int, float]]] | None = None) -> Path:
    """A sweep folder as ``predet sweep`` leaves it: summary.json and, per seed, evals.jsonl."""
    runs = []
    for seed, value in enumerate(box):
        runs.append({"name": "lr0.04_gamma0.5", "seed": seed, "status": "done",
                     "test": {"bbox/AP": value, "segm/AP": value - 0.01}})
        run_dir = folder / "lr0.04_gamma0.5" / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if curves:
            (run_dir / "evals.jsonl").write_text("".join(
                json.dumps({"iteration": i, "split": "val", "bbox/AP": v, "segm/AP": v}) + "\n" for i, v in curves[seed]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"runs": runs}))
    return folder / "summary.json"


def test_job_order_starts_the_3x_runs_first_and_each_finetune_waits_for_its_pretraining(seeds):
    settings = {"scratch": {"solver.lr": 0.04}, "predet": {"solver.lr": 0.04}}
    jobs = seeds.jobs_for(Path("out"), Path("data"), ["cls_only", "predet"], [1, 2], 1, settings, [], 3, 2, 150)
    names = [j.name for j in jobs]
    assert names[:3] == ["scratch 3x", "pretrain predet seed2", "predet 3x"]
    assert names.index("pretrain predet seed1") < names.index("pretrain cls_only seed1")  # costliest first
    assert {j.name: j.after for j in jobs}["finetune cls_only seed2"] == ["pretrain cls_only seed2"]
    assert {j.name: j.after for j in jobs}["predet 3x"] == ["pretrain predet seed2"]
    no_long = seeds.jobs_for(Path("out"), Path("data"), ["predet"], [1], 1, settings, [], 0, 1, 150)
    assert [j.name for j in no_long] == ["pretrain predet seed1", "finetune predet seed1"]
    with pytest.raises(ValueError, match="pretrain-seed-3x 5"):
        seeds.jobs_for(Path("out"), Path("data"), ["predet"], [1], 1, settings, [], 3, 5, 150)


def test_pooled_stats_cover_every_run_and_the_spread_between_pretraining_seeds(seeds):
    by_seed = {0: [{"test": {"bbox/AP": v}} for v in (0.10, 0.12, 0.14)], 1: [{"test": {"bbox/AP": 0.20}}]}
    stats = seeds.pooled(by_seed, "bbox/AP")
    assert stats["n"] == 4 and stats["pretrain_seeds"] == 2
    assert stats["mean"] == pytest.approx(0.14) and stats["std"] == pytest.approx(statistics.stdev([0.1, 0.12, 0.14, 0.2]))
    assert stats["between_pretrain_seeds_std"] == pytest.approx(statistics.stdev([0.12, 0.20]))
    win = seeds.compare({"mean": 0.2, "std": 0.01}, {"mean": 0.1, "std": 0.04})
    assert win["two_std"] == pytest.approx(0.08) and win["wins_by_2std"]
    assert not seeds.compare({"mean": 0.2, "std": 0.06}, {"mean": 0.1, "std": 0.01})["wins_by_2std"]


def test_time_to_accuracy_interpolates_between_evaluations(seeds):
    curve = [(150, 0.05), (300, 0.10), (450, 0.20)]
    assert seeds.reaches(curve, 0.15) == pytest.approx(375)
    assert seeds.reaches(curve, 0.01) == 150  # reached by the first evaluation
    assert seeds.reaches(curve, 0.30) is None
    assert seeds.mean_curve([[(150, 0.1), (300, 0.2)], [(150, 0.3)]]) == [(150, pytest.approx(0.2))]


def test_report_pools_the_ladder_with_new_seeds_and_names_what_is_missing(seeds, tmp_path):
    ladder, out = tmp_path / "ladder", tmp_path / "runs"
    for name, box in (("predet", [0.12, 0.11, 0.13]), ("cls_only", [0.07, 0.06, 0.08]), ("scratch", [0.06, 0.07, 0.065])):
        (ladder / f"summary_{name}_1x.json").write_text((write_sweep(ladder / name, box)).read_text())
        # the ladder's summaries are copies: their runs' folders are not beside them
    write_sweep(out / "pretrain_seed1" / "final" / "predet_1x", [0.14])
    scratch_curves = [[(150, 0.05), (300, 0.10)], [(150, 0.07), (300, 0.12)]]
    predet_curves = [[(150, 0.09), (300, 0.14)], [(150, 0.12), (300, 0.15)]]
    write_sweep(out / "schedule_3x" / "final" / "scratch_3x", [0.10, 0.12], scratch_curves)
    write_sweep(out / "schedule_3x" / "final" / "predet_3x", [0.14, 0.15], predet_curves)
    record = seeds.report(out, ladder, tmp_path / "results", ["predet", "cls_only"], [1], "cmd")

    predet = record["one_x_test"]["predet"]["bbox/AP"]
    assert predet["n"] == 4 and predet["per_pretrain_seed"] == {"0": pytest.approx(0.12), "1": pytest.approx(0.14)}
    assert record["missing"] == ["cls_only pre-training seed 1"]
    assert record["answers_1x"]["predet vs scratch"]["bbox/AP"]["wins_by_2std"]
    tta = record["three_x"]["bbox/AP"]["time_to_accuracy"]
    assert tta["target_scratch_final_val"] == pytest.approx(0.11)  # scratch's mean at its last evaluation
    # PreDet's mean curve (0.105 at 150, 0.145 at 300) crosses 0.11 an eighth of the way along
    assert tta["predet_mean_curve_iterations"] == pytest.approx(150 + 150 * 0.005 / 0.04)
    assert tta["predet_per_seed_iterations"] == [pytest.approx(150 + 150 * 0.02 / 0.05), 150]
    text = (tmp_path / "results" / "seeds.md").read_text()
    assert "Not run yet: cls_only pre-training seed 1." in text
    assert "| PreDet | 12.5 ± 1.3 |" in text
    assert (tmp_path / "results" / "curves_3x_bbox_AP.png").stat().st_size > 1000
