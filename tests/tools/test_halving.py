"""Successive halving: the rung arithmetic, the budgets each rung runs (decays inside them), that
only val chooses, that a killed search resumes at the rung it was in, and the CLI verb."""

import json
from pathlib import Path

import pytest
from helpers import CPU_FINETUNE_CONFIG

from predet.config import ConfigError
from predet.tools.sweep import launch as sweep_launch
from predet.tools.sweep.halving import halving, planned_cost, rung_budgets, rung_sizes


def test_the_rungs_of_the_papers_grid():
    assert rung_budgets(3, 3) == [1 / 9, 1 / 3, 1.0] and rung_budgets(2, 1) == [1.0]
    assert rung_sizes(30, 3, 3) == [30, 10, 3] and rung_sizes(4, 3, 3) == [4, 1, 1]
    # the Table-1 grid (5 lr x 3 gamma x 2 lr_mf) at eta 3: under a third of the exhaustive grid's 30 runs
    assert planned_cost(30, 3, 3) == pytest.approx(30 / 9 + 10 / 3 + 3)
    assert planned_cost(30, 3, 3) < 30 / 3
    assert planned_cost(30, 3, 3, seeds=3) == pytest.approx(planned_cost(30, 3, 3) + 2)
    with pytest.raises(ConfigError, match="eta >= 2"):
        rung_budgets(1, 3)


class FakeRuns:
    """Stands in for ``predet finetune``: val AP from lr and the budget, test AP that would
    choose the other way (it must never be read); counts launches."""

    def __init__(self, kill_at=None):
        self.launched, self.kill_at = [], kill_at

    def __call__(self, cmd, log_path, env=None):
        run_dir = Path(log_path).parent
        args = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))
        if self.kill_at is not None and len(self.launched) == self.kill_at:
            raise KeyboardInterrupt  # the sweep process is killed mid-rung
        self.launched.append((run_dir, args))
        lr, scale = float(args["solver.lr"]), float(args["schedule_scale"])
        val = lr * (1 + 10 * scale)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps({
            "iteration": 1, "val": {"bbox/AP": val}, "test": {"bbox/AP": 1 - lr} if args.get("data.test", "x") else {}}))
        return {"returncode": 0, "seconds": 60 * scale, "error": ""}


def test_halving_runs_each_rung_at_its_budget_keeps_the_best_on_val_and_seeds_the_winner(tmp_path, monkeypatch):
    fake = FakeRuns()
    monkeypatch.setattr(sweep_launch, "run_command", fake)
    grid = {"lr": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]}
    record = halving(CPU_FINETUNE_CONFIG, grid, seeds=3, out_dir=tmp_path, eta=3, rungs=3, echo=None,
                     overrides=["schedule_scale=0.9"])
    scales = [float(args["schedule_scale"]) for _, args in fake.launched]
    assert scales[:9] == [pytest.approx(0.1)] * 9 and scales[9:12] == [pytest.approx(0.3)] * 3
    assert scales[12:] == [pytest.approx(0.9)] * 3  # the last rung's one point, then the winner's seeds 1, 2
    assert all(args["data.test"] == "" for _, args in fake.launched[:12])  # partial budgets are never tested
    assert "data.test" not in fake.launched[12][1]
    assert [r["kept"] for r in record["rungs"]] == [["lr0.09", "lr0.08", "lr0.07"], ["lr0.09"], ["lr0.09"]]
    assert record["winner_name"] == "lr0.09" and record["best"]["val"]["bbox/AP"]["n"] == 3
    last = tmp_path / "rung2_budget1"
    seeds = sorted(p.name for p in (last / "lr0.09").iterdir())
    assert seeds == ["seed0", "seed1", "seed2"]
    # the rung's own comparison stays on disk beside the winner's seeds
    assert [r["name"] for r in json.loads((last / "summary.json").read_text())["runs"]] == ["lr0.09"]
    assert len(json.loads((last / "winner_summary.json").read_text())["runs"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["rung0_budget0.1111", "rung1_budget0.3333",
                                                                          "rung2_budget1"]
    assert record["seconds"] == pytest.approx(9 * 6 + 3 * 18 + 54 + 2 * 54)
    saved = json.loads((tmp_path / "halving.json").read_text())
    assert saved["winner_name"] == "lr0.09" and saved["planned_cost"] == pytest.approx(9 / 9 + 3 / 3 + 1 + 2)


def test_a_killed_search_resumes_at_its_rung_without_redoing_finished_runs(tmp_path, monkeypatch):
    grid = {"lr": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]}
    killed = FakeRuns(kill_at=7)  # all 6 runs of rung 0, one of rung 1, then the kill
    monkeypatch.setattr(sweep_launch, "run_command", killed)
    with pytest.raises(KeyboardInterrupt):
        halving(CPU_FINETUNE_CONFIG, grid, seeds=2, out_dir=tmp_path, eta=3, rungs=2, echo=None,
                overrides=["schedule_scale=1"])
    again = FakeRuns()
    monkeypatch.setattr(sweep_launch, "run_command", again)
    record = halving(CPU_FINETUNE_CONFIG, grid, seeds=2, out_dir=tmp_path, eta=3, rungs=2, echo=None,
                     overrides=["schedule_scale=1"])
    relaunched = [run_dir.relative_to(tmp_path).as_posix() for run_dir, _ in again.launched]
    assert relaunched == ["rung1_budget1/lr0.05/seed0", "rung1_budget1/lr0.06/seed1"]  # the rest is read back
    assert record["rungs"][0]["kept"] == ["lr0.06", "lr0.05"] and record["winner_name"] == "lr0.06"
    assert record["rungs"][0]["seconds"] == pytest.approx(6 * 20)  # finished runs keep their recorded time


def test_halving_refuses_what_would_replace_its_budgets(tmp_path):
    with pytest.raises(ConfigError, match="named schedule"):
        halving(CPU_FINETUNE_CONFIG, {"lr": [0.01, 0.02]}, out_dir=tmp_path, overrides=["schedule="], echo=None)
    with pytest.raises(ConfigError, match="schedule_scale for each rung"):
        halving(CPU_FINETUNE_CONFIG, {"schedule_scale": [0.1, 0.2]}, out_dir=tmp_path, echo=None)


def test_the_cli_runs_a_halving_search(tmp_path, monkeypatch, capsys):
    from predet.cli import main as cli_main

    monkeypatch.setattr(sweep_launch, "run_command", FakeRuns())
    code = cli_main(["sweep", "--config", str(CPU_FINETUNE_CONFIG), "--grid", "lr=0.01,0.02,0.04", "--search",
                     "halving", "--eta", "3", "--rungs", "2", "--seeds", "2", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "halving chose lr0.04" in out and (tmp_path / "halving.json").is_file()


def _val_file(path: Path, images: int) -> Path:
    records = [{"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(images)]
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                    "iscrowd": 0} for i in range(images)]
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def test_short_rungs_score_on_a_fixed_val_subset_and_the_last_rung_on_all_of_val(tmp_path, monkeypatch):
    fake = FakeRuns()
    monkeypatch.setattr(sweep_launch, "run_command", fake)
    val = _val_file(tmp_path / "val.json", 10)
    out = tmp_path / "search"
    record = halving(CPU_FINETUNE_CONFIG, {"lr": [0.01, 0.02, 0.03, 0.04]}, seeds=2, out_dir=out, eta=2, rungs=2,
                     echo=None, overrides=["schedule_scale=1", f"data.val={val}"], val_subset=3)
    short = [args for run_dir, args in fake.launched if run_dir.parent.parent.name == "rung0_budget0.5_val3"]
    full = [args for run_dir, args in fake.launched if run_dir.parent.parent.name == "rung1_budget1"]
    assert len(short) == 4 and len(full) == 3  # the two survivors, then the winner's second seed
    subset = {args["data.val"] for args in short}
    assert len(subset) == 1 and Path(subset.pop()).parent == out
    assert len(json.loads(Path(short[0]["data.val"]).read_text())["images"]) == 3
    assert all(args["data.val"] == str(val) for args in full)  # the user's val, not the subset
    assert record["val_subset"] == 3 and record["winner_name"] == "lr0.04"
    # a val split no larger than the subset is used whole, in the plain rung folders
    small = _val_file(tmp_path / "small.json", 3)
    record = halving(CPU_FINETUNE_CONFIG, {"lr": [0.01, 0.02]}, out_dir=tmp_path / "small_search", eta=2, rungs=2,
                     echo=None, overrides=["schedule_scale=1", f"data.val={small}"], val_subset=3)
    assert record["val_subset"] == 0 and (tmp_path / "small_search" / "rung0_budget0.5").is_dir()


def test_the_rung_val_subset_is_only_for_halving(tmp_path, capsys):
    from predet.cli import main as cli_main

    code = cli_main(["sweep", "--config", str(CPU_FINETUNE_CONFIG), "--grid", "lr=0.01,0.02", "--rung-val-subset", "50",
                     "--out", str(tmp_path)])
    assert code == 2 and "--search halving" in capsys.readouterr().err
