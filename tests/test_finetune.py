"""Fine-tuning end to end on tiny FashionDet: CLI finetune -> eval -> export, resume, optimiser groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import CPU_FINETUNE_CONFIG, CrashAt, tiny_finetune_overrides
from predet.cli import main as cli_main
from predet.config import ConfigError
from predet.detection.models import DetectorConfig, build_detector
from predet.engine.checkpoint import latest_checkpoint, load_checkpoint
from predet.engine.optim import build_optimizer, param_groups
from predet.finetune import finetune, load_finetune_config, mask_head_groups, resolve_solver


def test_mask_head_lr_is_lr_times_lr_mf():
    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, ["optim.lr_mf=4.0", "schedule=", "solver.lr=0.01"])
    detector = build_detector(DetectorConfig(backbone="resnet18", fpn_channels=32, box_head_dim=64,
                                             mask_head_dim=16), num_classes=3)
    optimizer = build_optimizer(param_groups(detector, mask_head_groups(detector, cfg.optim.lr_mf)), cfg.solver)
    mask_params = {id(p) for n, p in detector.named_parameters() if n.startswith("roi_heads.mask_")}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            expected = 0.04 if id(p) in mask_params else 0.01
            assert group["lr"] == pytest.approx(expected)
            seen.add(id(p))
    assert mask_params <= seen


def test_named_schedule_scales_with_batch_and_schedule_scale():
    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, ["schedule=1x", "schedule_scale=0.002", "train.batch_size=4"])
    solver = resolve_solver(cfg)
    assert solver.max_iters == 720 and solver.milestones == [480, 640]
    assert solver.lr == pytest.approx(0.02 * 4 / 16)
    full = resolve_solver(load_finetune_config(None, ["schedule=3x", "train.batch_size=16"]))
    assert (full.max_iters, full.milestones) == (270000, [180000, 240000])


def test_preset_sits_between_yaml_and_overrides():
    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, ["preset=coco/mask_rcnn/predet_ig50m"])
    assert (cfg.solver.lr, cfg.solver.gamma, cfg.optim.lr_mf) == (0.01, 0.1, 4.0)
    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, ["preset=lvis/mask_rcnn/predet_ig50m", "solver.gamma=0.3"])
    assert (cfg.solver.lr, cfg.solver.gamma) == (0.005, 0.3)
    with pytest.raises(ConfigError, match="predet_ig50m"):
        load_finetune_config(CPU_FINETUNE_CONFIG, ["preset=coco/mask_rcnn/predet_ig5m"])


def test_every_shipped_finetune_config_loads():
    for path in sorted(CPU_FINETUNE_CONFIG.parent.glob("*.yaml")):
        cfg = load_finetune_config(path)
        assert resolve_solver(cfg).max_iters > 0, path


def test_cli_finetune_eval_export_end_to_end(fashiondet_tiny, pretrain_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["finetune", "--config", str(CPU_FINETUNE_CONFIG),
            *tiny_finetune_overrides(fashiondet_tiny, run, str(pretrain_checkpoint), 6, **{"train.eval_period": 3})]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "fine-tuning finished at iteration 6" in out and "bbox/AP" in out
    results = json.loads((run / "results.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl", "segm/AP"):
        assert 0.0 <= results["val"][key] <= 1.0 or results["val"][key] == -1, key
    evals = [json.loads(l) for l in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [3, 6]
    report = json.loads((run / "init_report.json").read_text())
    assert len(report["loaded"]) > 50

    final = run / "checkpoints" / "model_final.pth"
    val = fashiondet_tiny / "det" / "annotations" / "val.json"
    assert cli_main(["eval", "--checkpoint", str(final), "--data", str(val), "--visualize", "2",
                     "--out", str(tmp_path / "eval")]) == 0
    assert "segm/AP" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["bbox/AP"] == results["val"]["bbox/AP"]
    assert len(list((tmp_path / "eval" / "visualize").glob("*.png"))) == 2

    assert cli_main(["export", "--checkpoint", str(final), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(next((tmp_path / "export").glob("*.safetensors")))
    weights = load_checkpoint(final)["model"]
    assert torch.equal(exported["backbone.fpn.inner_blocks.0.0.weight"], weights["backbone.fpn.inner_blocks.0.0.weight"])
    assert list((tmp_path / "export").glob("*-detectron2.pkl"))



def test_finetune_resume_equals_uninterrupted(fashiondet_tiny, pretrain_checkpoint, tmp_path, monkeypatch):
    def cfg(run, *extra):
        return load_finetune_config(CPU_FINETUNE_CONFIG,
                                    tiny_finetune_overrides(fashiondet_tiny, run, str(pretrain_checkpoint), 6) + list(extra))

    straight = finetune(cfg(tmp_path / "a"))
    import predet.finetune as finetune_module

    real_train = finetune_module.train
    monkeypatch.setattr(finetune_module, "train", lambda *a, **k: real_train(*a, **{**k, "hooks": [CrashAt(4)]}))
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(tmp_path / "b"))
    monkeypatch.setattr(finetune_module, "train", real_train)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint_0000004.pth"
    resumed = finetune(cfg(tmp_path / "b", "train.resume=true"))
    a = load_checkpoint(straight.train.last_checkpoint)["model"]
    b = load_checkpoint(resumed.train.last_checkpoint)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ap = lambda r: {k: v for k, v in r["val"].items() if "/AP" in k}
    assert ap(straight.results) == ap(resumed.results)


def test_scratch_init_and_bad_annotations_through_cli(fashiondet_tiny, tmp_path, capsys):
    bad = json.loads((fashiondet_tiny / "det" / "annotations" / "train.json").read_text())
    bad["annotations"][3]["category_id"] = 99
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    args = ["finetune", "--config", str(CPU_FINETUNE_CONFIG),
            *tiny_finetune_overrides(fashiondet_tiny, tmp_path / "run", "scratch", 2, **{"data.train": path})]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "annotations[3]" in err and "category_id" in err


def test_unreadable_training_image_is_skipped_listed_and_reported(fashiondet_tiny, tmp_path):
    """A zero-byte image in the detection set: the run goes on, skipped.jsonl and results.json say so."""
    import shutil

    from predet.data.weak import DeterministicBatchSampler
    from predet.detection.datasets import CocoDetection

    det = fashiondet_tiny / "det"
    images = tmp_path / "images"
    shutil.copytree(det / "images", images)
    train_json = det / "annotations" / "train.json"
    dataset = CocoDetection(train_json, images, train=True)
    first = DeterministicBatchSampler(len(dataset), 2, seed=0).batch(0)[0][0]  # read at iteration 1
    bad = dataset.image_path(first)
    bad.write_bytes(b"")
    overrides = tiny_finetune_overrides(fashiondet_tiny, tmp_path / "run", "scratch", 2, **{
        "data.train_images": images, "data.val": "", "train.max_skipped_fraction": 0.5,
        "model.arch": "faster_rcnn"})
    out = finetune(load_finetune_config(CPU_FINETUNE_CONFIG, overrides))
    assert out.train.iteration == 2 and out.train.skipped == 1
    skipped = [json.loads(l) for l in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [r["path"] for r in skipped] == [str(bad)]
    results = json.loads(out.results_path.read_text())
    assert results["skipped_images"]["count"] == 1
