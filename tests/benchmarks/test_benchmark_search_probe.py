"""The issue-20 benchmarks' arithmetic: the probe's rank agreement and cost records, and the
search benchmark's folders, cost fraction and verdict."""

import json
import math

import pytest
from helpers import load_benchmarks


@pytest.fixture
def probe(monkeypatch):
    return load_benchmarks(monkeypatch, "fashiondet_benchmark", "fashiondet_probe")


@pytest.fixture
def search(monkeypatch):
    return load_benchmarks(monkeypatch, "fashiondet_benchmark", "fashiondet_search")


def test_spearman_ranks_with_ties(probe):
    assert probe.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert probe.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # ties take their average rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3)
    assert probe.spearman([1, 2, 2, 5], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(probe.spearman([1, 1, 1], [1, 2, 3]))  # no order to agree with


def test_probe_points_read_the_logged_probes_floor_and_seconds(probe, tmp_path):
    records = [{"iteration": 200, "probe/bbox/AP": 0.024, "probe/seconds": 70.0},
               {"iteration": 200, "probe/bbox/AP_scratch": 0.012, "probe/seconds_scratch": 80.0},
               {"iteration": 300, "losses": {"total_loss": 1.0}},
               {"iteration": 400, "probe/bbox/AP": 0.035, "probe/seconds": 75.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    points, floor, seconds = probe.probe_points(tmp_path)
    assert points == pytest.approx({200: 2.4, 400: 3.5}) and floor == pytest.approx(1.2)
    assert seconds == pytest.approx(225.0)


def test_each_halving_setting_gets_its_own_folder(search):
    assert search.halving_folder(3, 3, 0) == "halving"  # the default search's folder, read back as before
    assert search.halving_folder(4, 3, 100) == "halving_eta4_rungs3_val100"
    assert search.halving_folder(3, 2, 0) == "halving_eta3_rungs2"


def _sweep_runs(name, seconds, test=None):
    return {"name": name, "status": "done", "seconds": seconds, "test": test or {}}


def test_the_search_verdict_needs_both_the_cost_and_the_test_ap(search):
    setting = {"solver.lr": 0.03}
    finals_runs = [_sweep_runs("lr0.03", 100, {"bbox/AP": ap, "segm/AP": ap}) for ap in (0.11, 0.12, 0.13)]
    found = {
        "winners": {"exhaustive": setting, "halving": setting},
        "finals": {"exhaustive": {"runs": finals_runs}, "halving": {"runs": finals_runs}},
        "exhaustive": {"runs": [_sweep_runs(f"p{i}", 100) for i in range(30)], "best": {"mean": 0.115}},
        "halving": {"rungs": [{"budget": 1 / 9, "points": ["a"] * 30, "kept": ["a"] * 10, "seconds": 600},
                              {"budget": 1 / 3, "points": ["a"] * 10, "kept": ["a"] * 3, "seconds": 300},
                              {"budget": 1.0, "points": ["a"] * 3, "kept": ["a"], "seconds": 300}],
                    "best": {"mean": 0.115}},
    }
    out = search.summarize("predet", found, 30, 3, 3)
    assert out["halving_cost_fraction"] == pytest.approx(1200 / 3000)
    assert out["halving"]["test"]["bbox/AP"]["mean"] == pytest.approx(12.0)
    assert out["halving_test_box_gap"] == pytest.approx(0) and not out["goal_met"]  # 40 % of the cost: missed
    found["halving"]["rungs"][0]["seconds"] = 300
    assert search.summarize("predet", found, 30, 3, 3)["goal_met"]  # 30 %, the same test AP: met
