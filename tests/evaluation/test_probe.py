"""The transfer probe during pre-training: when it runs, what it logs, that it is deterministic
for a checkpoint and seed, that a resumed run logs what finished meanwhile, and the bad inputs."""

import json

import pytest
import yaml
from helpers import (
    CPU_FINETUNE_CONFIG,
    CPU_PRETRAIN_CONFIG,
    probe_overrides,
    tiny_pretrain_config,
)

from predet.cli import main as cli_main
from predet.engine.metrics import read_metrics
from predet.pretrain import pretrain


def probe_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "probe" in r]


def test_probes_run_every_period_and_at_the_end_beside_a_floor_and_are_deterministic(fashiondet_tiny, tmp_path):
    aps = {}
    for background in ("true", "false"):  # beside the run, or the run waiting: the same numbers
        run = tmp_path / background
        pretrain(tiny_pretrain_config(fashiondet_tiny / "weak", run, 5, **probe_overrides(
            fashiondet_tiny, **{"probe.background": background, "probe.val_subset": 8})))
        records = probe_records(run)
        by_name = {r["probe"]: r for r in records}
        assert sorted(by_name) == ["iter0000002", "iter0000004", "iter0000005", "scratch"]  # period 2, the end
        assert by_name["scratch"]["iteration"] == 0 and "probe/bbox/AP_scratch" in by_name["scratch"]
        for name in ("iter0000002", "iter0000004", "iter0000005"):
            record = by_name[name]
            assert record["iteration"] == int(name[4:]) and 0 <= record["probe/bbox/AP"] <= 1
            assert record["probe/seconds"] > 0 and "probe/segm/AP" in record
            folder = run / "probe" / name
            results = json.loads((folder / "results.json").read_text())
            assert results["val"]["bbox/AP"] == record["probe/bbox/AP"]
            assert results["solver"]["max_iters"] == 4 and results["train_data"]["images"] == 8
            config = yaml.safe_load((folder / "config.yaml").read_text())
            assert config["data"]["val"] == str(run / "probe" / "val.subset8.seed0.json")  # one fixed val subset
            assert config["model"]["freeze_at"] == 5  # probe.freeze_backbone
            assert not (folder / "init.pth").exists()  # tidied once logged
        floor = yaml.safe_load((run / "probe" / "scratch" / "config.yaml").read_text())
        assert floor["init"] == "scratch" and floor["data"]["val"] == config["data"]["val"]
        aps[background] = {n: r.get("probe/bbox/AP", r.get("probe/bbox/AP_scratch")) for n, r in by_name.items()}
    assert aps["true"] == aps["false"]


def test_a_resumed_run_logs_the_probes_that_finished_and_probes_on(fashiondet_tiny, tmp_path):
    run = tmp_path / "run"
    overrides = probe_overrides(fashiondet_tiny, **{"probe.background": "false", "train.checkpoint_period": 4,
                                                   "train.resume": "true"})
    pretrain(tiny_pretrain_config(fashiondet_tiny / "weak", run, 4, **overrides))
    # as if the run had been killed after its iteration-4 probe finished but before it was logged
    metrics = run / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines() if '"probe": "iter0000004"' not in line]
    metrics.write_text("\n".join(lines) + "\n")
    pretrain(tiny_pretrain_config(fashiondet_tiny / "weak", run, 6, **overrides))  # grown: resumes at 4
    names = [r["probe"] for r in probe_records(run)]
    assert sorted(names) == ["iter0000002", "iter0000004", "iter0000006", "scratch"]  # each once


def test_the_probe_budget_is_its_iterations_with_the_decays_inside():
    from predet.config.finetune import load_finetune_config
    from predet.config.pretrain import ProbeConfig
    from predet.evaluation.probe import probe_schedule_scale
    from predet.finetune import resolve_solver

    probe = ProbeConfig(data="x.json", val="y.json", config=str(CPU_FINETUNE_CONFIG), iters=90)
    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, [f"schedule_scale={probe_schedule_scale(probe)!r}"])
    solver = resolve_solver(cfg, world_size=1)
    assert solver.max_iters == 90 and solver.milestones == [60, 80]  # 2/3 and 8/9 of it


@pytest.mark.parametrize("bad, message", [
    ({"probe.val": ""}, "probe.val is empty"),
    ({"probe.val": "/nowhere/val.json"}, "probe.val=/nowhere/val.json: no such file"),
    ({"probe.overrides": "[model.arch=nope]"}, "model.arch"),
])
def test_a_probe_that_cannot_run_is_one_line_before_the_run(fashiondet_tiny, tmp_path, capsys, bad, message):
    from helpers import tiny_pretrain_overrides

    overrides = tiny_pretrain_overrides(fashiondet_tiny / "weak", tmp_path / "run", 2,
                                        **probe_overrides(fashiondet_tiny, **bad))
    assert cli_main(["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()
