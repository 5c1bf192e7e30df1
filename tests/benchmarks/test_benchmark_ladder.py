"""The FashionDet ladder benchmark's scheduling: no lane waits for work it does not depend on."""

import importlib.util
import itertools
import json
import sys
import threading
import time
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "fashiondet_benchmark.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("fashiondet_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fake_runners(bench, monkeypatch, log, on_pretrain=None):
    """Replace the three process-launching steps by functions that record what ran, in order."""
    lock = threading.Lock()

    def record(*entry):
        with lock:
            log.append(entry)

    def pretrain_task(out, data, name, extra):
        def task():
            if on_pretrain:
                on_pretrain(name)
            record("pretrain", name)
        return task

    def selection_task(out, name, init, grid, base):
        def task():
            record("select", name, init)
            return {"solver.lr": 0.04 if name == "scratch" else 0.02}
        return task

    def final_task(out, name, schedule, init, settings, seeds, base, curve_period):
        return lambda: record("final", name, schedule, settings["solver.lr"], seeds)

    monkeypatch.setattr(bench, "pretrain_task", pretrain_task)
    monkeypatch.setattr(bench, "selection_task", selection_task)
    monkeypatch.setattr(bench, "final_task", final_task)


def test_scratch_is_selected_while_predet_pretrains(bench, monkeypatch, tmp_path):
    scratch_selected = threading.Event()
    log = []

    def on_pretrain(name):
        if name == "predet":  # would time out if scratch's selection waited for this pre-training
            assert scratch_selected.wait(timeout=10)

    fake_runners(bench, monkeypatch, log, on_pretrain)
    original = bench.selection_task

    def selection_task(*args):
        task = original(*args)

        def run():
            result = task()
            if args[1] == "scratch":
                scratch_selected.set()
            return result
        return run

    monkeypatch.setattr(bench, "selection_task", selection_task)
    chosen, dirs = bench.run_ladder(tmp_path, tmp_path, ["predet", "supervised", "cls_only"], [], [{"solver.lr": [0.02, 0.04]}],
                                    ["scratch", "predet"], [], seeds=3, curve_period=0, lanes=2, long_schedule=False)
    assert chosen == {"scratch": {"solver.lr": 0.04}, "predet": {"solver.lr": 0.02},
                      "supervised": {"solver.lr": 0.02}, "cls_only": {"solver.lr": 0.02}}  # the others take PreDet's
    assert sorted(d.name for d in dirs) == ["cls_only_1x", "predet_1x", "scratch_1x", "supervised_1x"]
    finals = sorted(e[1:] for e in log if e[0] == "final")
    assert finals == [("cls_only", "1x", 0.02, 3), ("predet", "1x", 0.02, 3), ("scratch", "1x", 0.04, 3),
                      ("supervised", "1x", 0.02, 3)]
    # every run that needs a pre-training comes after it
    for name in ("predet", "supervised", "cls_only"):
        first_use = min(i for i, e in enumerate(log) if e[0] != "pretrain" and e[1] == name)
        assert log.index(("pretrain", name)) < first_use


def test_long_schedule_runs_3x_for_scratch_and_predet_only(bench, monkeypatch, tmp_path):
    log = []
    fake_runners(bench, monkeypatch, log)
    _, dirs = bench.run_ladder(tmp_path, tmp_path, list(bench.VARIANTS), [], [{"solver.lr": [0.02, 0.04]}],
                               ["scratch", "predet"], [], seeds=1, curve_period=0, lanes=2, long_schedule=True)
    assert {e[1] for e in log if e[0] == "final" and e[2] == "3x"} == {"scratch", "predet"}
    assert {e[1] for e in log if e[0] == "pretrain"} == set(bench.VARIANTS)
    assert len(dirs) == len(bench.VARIANTS) + 1 + 2


def test_3x_runs_take_their_own_seed_count(bench, monkeypatch, tmp_path):
    log = []
    fake_runners(bench, monkeypatch, log)
    bench.run_ladder(tmp_path, tmp_path, ["predet"], [], [{"solver.lr": [0.02]}], ["scratch", "predet"], [],
                     seeds=3, curve_period=0, lanes=1, long_schedule=True, seeds_3x=1)
    finals = {(e[1], e[2]): e[4] for e in log if e[0] == "final"}
    assert finals == {("scratch", "1x"): 3, ("predet", "1x"): 3, ("scratch", "3x"): 1, ("predet", "3x"): 1}


def test_a_choice_at_the_grid_edge_is_flagged(bench):
    grid = {"solver.lr": [0.02, 0.04, 0.08], "solver.gamma": [0.1]}
    assert bench.chosen_at_grid_edge({"scratch": {"solver.lr": 0.08, "solver.gamma": 0.1},
                                      "predet": {"solver.lr": 0.04, "solver.gamma": 0.1}}, grid) == {"scratch": ["solver.lr"]}


def test_a_final_run_waits_for_its_own_pretraining(bench, monkeypatch, tmp_path):
    log = []

    def on_pretrain(name):
        if name == "pretext_only":
            time.sleep(0.5)  # the last, slow pre-training: the other lane is free long before

    fake_runners(bench, monkeypatch, log, on_pretrain)
    bench.run_ladder(tmp_path, tmp_path, list(bench.VARIANTS), [], [{"solver.lr": [0.02]}], ["scratch", "predet"], [],
                     seeds=1, curve_period=0, lanes=2, long_schedule=False)
    assert log.index(("pretrain", "pretext_only")) < log.index(("final", "pretext_only", "1x", 0.02, 1))


def test_a_failed_pretraining_skips_what_needs_it_and_is_raised(bench, monkeypatch, tmp_path):
    log = []

    def on_pretrain(name):
        if name == "predet":
            raise RuntimeError("pre-training predet failed")

    fake_runners(bench, monkeypatch, log, on_pretrain)
    with pytest.raises(RuntimeError, match="pre-training predet failed"):
        bench.run_ladder(tmp_path, tmp_path, ["predet", "cls_only"], [], [{"solver.lr": [0.02]}], ["scratch", "predet"],
                         [], seeds=1, curve_period=0, lanes=2, long_schedule=False)
    ran = {e[:2] for e in log}
    assert ("select", "scratch") in ran and ("final", "scratch") in ran  # independent work still ran
    assert ("select", "predet") not in ran and ("final", "cls_only") not in ran  # it takes predet's choice


def test_a_job_waiting_for_an_unknown_job_is_an_error(bench):
    with pytest.raises(ValueError, match="unknown"):
        bench.run_jobs([bench.Job("a", lambda: None, ["b"])], lanes=2)


def write_summary(out, name, mean, std):
    folder = out / "final" / name
    folder.mkdir(parents=True)
    entry = {"test": {"bbox/AP": {"mean": mean, "std": std, "n": 3}}}
    (folder / "summary.json").write_text(json.dumps({"settings": [entry]}))


def test_answers_call_a_win_only_beyond_twice_the_larger_std(bench, tmp_path):
    write_summary(tmp_path, "scratch_1x", 4.0, 0.5)
    write_summary(tmp_path, "predet_1x", 7.4, 0.5)  # +3.4 > 2 * 0.5
    write_summary(tmp_path, "pretext_only_1x", 6.8, 0.6)  # predet's +0.6 < 2 * 0.6
    write_summary(tmp_path, "scratch_3x", 9.0, None)  # one seed: no std
    dirs = [tmp_path / "final" / n for n in ("scratch_1x", "predet_1x", "pretext_only_1x", "scratch_3x")]
    result = bench.answers(dirs)
    assert result["predet_1x_beats_scratch_1x_by_2std"]["wins"] is True
    assert result["predet_1x_beats_pretext_only_1x_by_2std"] == pytest.approx(
        {"gap_ap": 0.6, "two_std": 1.2, "wins": False})
    assert result["pretext_only_1x_beats_scratch_1x_by_2std"]["wins"] is True
    assert result["supervised_1x_beats_scratch_1x_by_2std"] is None  # rung not run
    assert result["predet_1x_reaches_scratch_3x"] is False
    # A 3x folder an earlier plan left behind does not answer for this one (--no-3x).
    assert bench.answers(dirs[:3])["predet_1x_reaches_scratch_3x"] is None


def test_the_report_reads_the_final_setting_not_a_one_seed_grid_point(bench, tmp_path):
    """Seed 0 of lr 0.04 beat the 3-seed mean of the chosen lr 0.02 on val: the table must
    still show lr 0.02, the setting the final runs used."""
    run_dir = tmp_path / "final" / "predet_1x"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"best": {"name": "lr0.02", "settings": {"solver.lr": 0.02}}}))
    assert bench.chosen_setting_dir(run_dir) == run_dir / "lr0.02"
    (run_dir / "summary.json").write_text(json.dumps({"best": None}))
    with pytest.raises(RuntimeError, match="no finished setting"):
        bench.chosen_setting_dir(run_dir)


def fake_val_sweep(scores, ran):
    """A sweep stand-in: each grid point's val bbox/AP comes from ``scores`` (by its settings)."""
    def run_grid(grid):
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        ran.extend(points)
        rows = [{"settings": p, "mean": scores[tuple(sorted(p.items()))]} for p in points]
        return {"best": max(rows, key=lambda r: r["mean"])}
    return run_grid


def test_later_stages_vary_one_key_around_the_best_and_keep_it_unless_beaten(bench):
    lr, wu, g = "solver.lr", "solver.warmup_iters", "solver.gamma"
    scores = {((g, 0.1), (lr, 0.02), (wu, 3)): 5.0, ((g, 0.1), (lr, 0.04), (wu, 3)): 6.0,
              ((g, 0.1), (lr, 0.04), (wu, 0)): 5.5, ((g, 0.1), (lr, 0.04), (wu, 40)): 4.0,  # warm-up: the default stays
              ((g, 0.3), (lr, 0.04), (wu, 3)): 7.0, ((g, 0.5), (lr, 0.04), (wu, 3)): 6.5}
    ran = []
    defaults = {wu: 3, g: 0.1}
    settings, summaries = bench.select_in_stages(
        [{lr: [0.02, 0.04]}, {wu: [0, 3, 40]}, {g: [0.1, 0.3, 0.5]}], fake_val_sweep(scores, ran), defaults.get)
    assert settings == {lr: 0.04, wu: 3, g: 0.3}
    assert len(summaries) == 3
    assert ran.count({lr: 0.04, wu: 3, g: 0.1}) == 1  # the current value is not run twice
    with pytest.raises(ValueError, match="one key"):
        bench.select_in_stages([{lr: [0.02]}, {wu: [0], g: [0.3]}], fake_val_sweep(scores, []), defaults.get)


def test_a_default_left_by_a_later_stage_counts_for_the_edge_check(bench):
    grid = {"solver.lr": [0.02, 0.04, 0.08], "solver.gamma": [0.1, 0.3, 0.5]}
    assert bench.chosen_at_grid_edge({"scratch": {"solver.lr": 0.04}}, grid, {"solver.gamma": 0.1}) == \
        {"scratch": ["solver.gamma"]}
    assert bench.chosen_at_grid_edge({"scratch": {"solver.lr": 0.04, "solver.gamma": 0.3}}, grid,
                                     {"solver.gamma": 0.1}) == {}


def test_a_stage_may_revisit_a_key_and_keeps_the_run_names_key_order(bench):
    lr, g = "solver.lr", "solver.gamma"
    scores = {((g, 0.1), (lr, 0.02)): 5.0, ((g, 0.1), (lr, 0.04)): 6.0, ((g, 0.5), (lr, 0.04)): 7.0,
              ((g, 0.5), (lr, 0.02)): 7.5, ((g, 0.5), (lr, 0.08)): 3.0}
    ran = []
    settings, _ = bench.select_in_stages([{lr: [0.02, 0.04]}, {g: [0.1, 0.5]}, {lr: [0.02, 0.04, 0.08]}],
                                         fake_val_sweep(scores, ran), {g: 0.1}.get)
    assert settings == {lr: 0.02, g: 0.5}
    assert list(settings) == [lr, g]  # the final run's folder name matches its selection run's
    assert ran.count({lr: 0.04, g: 0.5}) == 1


def test_the_1x_runs_the_answers_need_come_first(bench, monkeypatch, tmp_path):
    log = []
    fake_runners(bench, monkeypatch, log)
    bench.run_ladder(tmp_path, tmp_path, list(bench.VARIANTS), [], [{"solver.lr": [0.02]}], ["scratch", "predet"], [],
                     seeds=1, curve_period=0, lanes=1, long_schedule=False)
    assert [e[1] for e in log if e[0] == "final"] == ["scratch", "predet", "cls_only", "supervised", "pretext_only"]


def test_every_selection_folder_names_each_searched_key(bench, tmp_path):
    """A folder's name must say its whole searched setting: with the later stage's key left out
    of the first grid, ``lr0.04`` would mean another gamma once the config default changed."""
    lr, g = "solver.lr", "solver.gamma"
    from predet.tools.sweep.grid import run_name
    names = []

    def run_grid(grid):
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        names.extend(run_name(p) for p in points)
        return {"best": {"settings": points[0], "mean": 1.0}}

    for gamma_default in (0.1, 0.5):
        names.clear()
        bench.select_in_stages([{lr: [0.02, 0.04]}, {g: [0.3, 0.5]}], run_grid, {g: gamma_default}.get)
        assert names[:2] == [f"lr0.02_gamma{gamma_default}", f"lr0.04_gamma{gamma_default}"]
        assert all("gamma" in n for n in names)


def test_the_wide_search_starts_where_it_first_ran_whatever_the_config_default(bench):
    """--wide pins gamma 0.1 and warm-up 1000 (the defaults it first ran from), so its folders
    name those and not the config's gamma 0.5; the default plan starts from the config."""
    from predet.tools.sweep.grid import run_name
    grids = []

    def run_grid(grid):
        grids.append(grid)
        return {"best": {"settings": {k: v[0] for k, v in grid.items()}, "mean": 1.0}}

    stages, start = bench.selection_plan(None, None, wide=True)
    bench.select_in_stages(stages, run_grid, lambda k: bench.config_value(k, start))
    assert [len(stage) for stage in stages] == [1, 1, 1, 1]
    assert run_name({k: v[0] for k, v in grids[0].items()}) == "lr0.01_warmup_iters1000_gamma0.1"
    stages, start = bench.selection_plan(None, None, wide=False)
    grids.clear()
    bench.select_in_stages(stages, run_grid, lambda k: bench.config_value(k, start))
    assert start == [] and grids[0] == {"solver.lr": [0.02, 0.04, 0.08], "solver.gamma": [0.5]}
