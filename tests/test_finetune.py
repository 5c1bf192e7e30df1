"""Fine-tuning end to end on tiny FashionDet: CLI finetune -> eval -> export, resume, optimiser groups."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CPU_FINETUNE_CONFIG, CrashAt, tiny_finetune_overrides
from safetensors import safe_open
from safetensors.torch import load_file

from predet.checkpoint.io import latest_checkpoint, load_checkpoint
from predet.cli import main as cli_main
from predet.config import ConfigError, to_dict
from predet.config.finetune import DetectorConfig
from predet.engine.optim import build_optimizer, param_groups
from predet.finetune import (
    finetune,
    load_finetune_config,
    mask_head_groups,
    resolve_solver,
)
from predet.modeling.detectors import build_detector


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
    assert solver.lr == pytest.approx(cfg.solver.lr * 4 / 16)
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
    old_umask = os.umask(0o022)
    try:
        assert cli_main(args) == 0
    finally:
        os.umask(old_umask)
    for name in ("results.json", "config.yaml", "checkpoints/model_final.pth", "log.txt",
                 "inference/val/coco_instances_results.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    log = (run / "log.txt").read_text()
    assert "training data:" in log and "init weights:" in log and "\r" not in log
    out = capsys.readouterr().out
    assert "fine-tuning finished at iteration 6" in out and "bbox/AP" in out
    results = json.loads((run / "results.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl", "segm/AP"):
        assert 0.0 <= results["val"][key] <= 1.0 or results["val"][key] == -1, key
    evals = [json.loads(l) for l in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [3, 6]
    assert all([row["name"] for row in e["per_category"]] == names_of(fashiondet_tiny) for e in evals)
    assert (run / "inference" / "val_iter0000003" / "coco_instances_results.json").is_file()  # periodic, too
    report = json.loads((run / "init_report.json").read_text())
    assert len(report["loaded"]) > 50
    names = [c["name"] for c in json.loads((fashiondet_tiny / "det" / "annotations" / "val.json").read_text())["categories"]]
    assert [row["name"] for row in results["per_category"]["val"]] == names
    detections = json.loads((run / "inference" / "val" / "coco_instances_results.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(detections[0])

    final = run / "checkpoints" / "model_final.pth"
    val = fashiondet_tiny / "det" / "annotations" / "val.json"
    assert cli_main(["eval", "--checkpoint", str(final), "--data", str(val), "--visualize", "2",
                     "--out", str(tmp_path / "eval")]) == 0
    eval_out = capsys.readouterr().out
    assert "segm/AP" in eval_out and "| category |" in eval_out
    evaluated = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert evaluated["bbox/AP"] == results["val"]["bbox/AP"]
    assert evaluated["per_category"] == results["per_category"]["val"]
    assert len(list((tmp_path / "eval" / "visualize").glob("*.png"))) == 2

    assert json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())

    # predict: a folder of unlabelled images, and a COCO image-info json
    images = fashiondet_tiny / "det" / "images"
    assert cli_main(["predict", "--checkpoint", str(final), "--images", str(images), "--out", str(tmp_path / "pred"),
                     "--score-thresh", "0.01", "--visualize", "1", "--no-progress"]) == 0
    assert "detections on" in capsys.readouterr().out
    info = json.loads((tmp_path / "pred" / "image_info.json").read_text())
    files = sorted(p for p in images.rglob("*") if p.is_file())
    assert [im["file_name"] for im in info["images"]] == [p.relative_to(images).as_posix() for p in files]
    predicted = json.loads((tmp_path / "pred" / "coco_instances_results.json").read_text())
    assert predicted and min(r["score"] for r in predicted) >= 0.01
    assert {r["image_id"] for r in predicted} <= {im["id"] for im in info["images"]}
    assert {r["category_id"] for r in predicted} <= {c["id"] for c in info["categories"]}
    assert len(list((tmp_path / "pred" / "visualize").glob("*.png"))) == 1
    image_info = tmp_path / "image_info.json"
    image_info.write_text(json.dumps({"images": [{"id": im["id"], "file_name": im["file_name"]}
                                                 for im in json.loads(val.read_text())["images"]]}))
    assert cli_main(["predict", "--checkpoint", str(final), "--images", str(image_info), "--image-root", str(images),
                     "--out", str(tmp_path / "pred2"), "--no-progress"]) == 0
    val_ids = {im["id"] for im in json.loads(val.read_text())["images"]}
    assert {r["image_id"] for r in json.loads((tmp_path / "pred2" / "coco_instances_results.json").read_text())} <= val_ids
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(final), "--images", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no such image folder" in capsys.readouterr().err

    assert cli_main(["export", "--checkpoint", str(final), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(next((tmp_path / "export").glob("*.safetensors")))
    weights = load_checkpoint(final)["model"]
    assert torch.equal(exported["backbone.fpn.inner_blocks.0.0.weight"], weights["backbone.fpn.inner_blocks.0.0.weight"])
    assert list((tmp_path / "export").glob("*-detectron2.pkl"))
    # metadata to rebuild the detector and map labels, in the header and in a JSON beside it
    meta = json.loads(next((tmp_path / "export").glob("*-mask_rcnn.json")).read_text())
    with safe_open(str(next((tmp_path / "export").glob("*.safetensors"))), "pt") as f:
        header = f.metadata()
    assert json.loads(header["labels"]) == meta["labels"] and header["arch"] == "mask_rcnn"
    val_json = json.loads(val.read_text())
    assert [meta["labels"][str(i + 1)]["category_id"] for i in range(len(meta["labels"]))] == \
        [c["id"] for c in val_json["categories"]]
    assert meta["labels"]["1"]["name"] == val_json["categories"][0]["name"]
    assert meta["image_mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["min_size"] == 96
    rebuilt = build_detector(DetectorConfig(**meta["config"]), meta["num_classes_with_background"] - 1)
    rebuilt.load_state_dict({k: v for k, v in exported.items() if not k.endswith("num_batches_tracked")})
    fragment = (tmp_path / "export" / "model_final-mask_rcnn-detectron2.yaml").read_text()
    assert "STRIDE_IN_1X1: false" in fragment and "model_final-mask_rcnn-detectron2.pkl" in fragment


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


def test_named_schedule_is_the_default_and_conflicts_are_errors():
    cfg = load_finetune_config(None, ["train.batch_size=8"])
    assert cfg.schedule == "1x"
    solver = resolve_solver(cfg)
    assert (solver.max_iters, solver.milestones) == (180000, [120000, 160000])  # 1x at batch 8
    assert solver.lr == pytest.approx(0.02 * 8 / 16)
    with pytest.raises(ConfigError, match="solver.max_iters"):
        resolve_solver(load_finetune_config(None, ["solver.max_iters=500"]))
    assert resolve_solver(load_finetune_config(None, ["schedule=", "solver.max_iters=500"])).max_iters == 500


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["finetune", "--config", "finetune/fashiondet_r18_cpu", "--print-config",
                     f"train.run_dir={run}", "preset=coco/mask_rcnn/predet_ig50m", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["optim"]["lr_mf"] == 4.0 and printed["train"]["batch_size"] == 2  # preset + override
    assert printed == to_dict(load_finetune_config("finetune/fashiondet_r18_cpu", [
        f"train.run_dir={run}", "preset=coco/mask_rcnn/predet_ig50m", "train.batch_size=2"]))
    assert "# schedule=1x at batch 2" in out and not run.exists()


def test_files_follow_the_umask(tmp_path):
    from predet.checkpoint.atomic import atomic_write
    from predet.evaluation.coco import write_results_json

    old = os.umask(0o027)
    try:
        a = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        b = write_results_json({"x": 1}, tmp_path / "results.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == 0o640 and stat.S_IMODE(b.stat().st_mode) == 0o640


def test_scratch_with_frozen_bn_picks_group_norm_and_says_so(fashiondet_tiny, tmp_path):
    run = tmp_path / "run"
    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, tiny_finetune_overrides(
        fashiondet_tiny, run, "scratch", 2, **{"model.norm": "frozen_bn", "data.val": "", "model.freeze_at": 2}))
    out = finetune(cfg)
    saved = load_checkpoint(out.train.last_checkpoint)["config"]["model"]
    assert (saved["norm"], saved["freeze_at"]) == ("gn", 0)
    log = (run / "log.txt").read_text()
    assert "using model.norm=gn" in log and "freeze_at=2 would freeze" in log
    assert "\r" not in log


def names_of(fashiondet) -> list[str]:
    return [c["name"] for c in json.loads((fashiondet / "det" / "annotations" / "val.json").read_text())["categories"]]


def test_unreadable_training_image_is_skipped_listed_and_reported(fashiondet_tiny, tmp_path):
    """A zero-byte image in the detection set: the run goes on, skipped.jsonl and results.json say so."""
    import shutil

    from predet.data.coco import CocoDetection
    from predet.data.samplers import DeterministicBatchSampler

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


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_data_flip_p_is_what_the_training_set_flips_with(fashiondet_tiny, tmp_path, flip_p):
    # data.flip_p was never passed on: 0 and 1 trained bit-identical weights
    from predet.data.coco import build_detection_dataset
    from predet.finetune import build_training_set

    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, tiny_finetune_overrides(
        fashiondet_tiny, tmp_path / "run", "scratch", **{"data.flip_p": flip_p}))
    train_set = build_training_set(cfg, tmp_path / "run")
    plain = build_detection_dataset(cfg.data.train, cfg.data.train_images)
    for i in range(4):
        image, _ = train_set[(i, 7 + i)]
        expected = plain[i][0] if flip_p == 0 else plain[i][0].flip(-1)
        assert torch.equal(image, expected), i


def test_a_restarted_run_writes_the_subset_of_the_new_training_file(fashiondet_tiny, tmp_path):
    # the subset json in the run folder is named after the training file; a new file of the
    # same name must not meet the old subset
    from predet.finetune import training_annotations

    det = fashiondet_tiny / "det" / "annotations"
    run = tmp_path / "run"
    for name, source in (("a", det / "train.json"), ("b", det / "val.json")):
        copy = tmp_path / name / "train.json"
        copy.parent.mkdir()
        copy.write_bytes(source.read_bytes())
        cfg = load_finetune_config(CPU_FINETUNE_CONFIG, tiny_finetune_overrides(
            fashiondet_tiny, run, "scratch", **{"data.train": copy, "data.subset": 5}))
        subset = json.loads(Path(training_annotations(cfg, run)).read_text())
        names = {img["file_name"] for img in json.loads(source.read_text())["images"]}  # ids repeat across splits
        assert {img["file_name"] for img in subset["images"]} <= names and len(subset["images"]) == 5, name


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_every_architecture_fine_tunes_and_evaluates(arch, fashiondet_tiny, tmp_path):
    """Mask R-CNN runs everywhere else; RetinaNet's torchvision losses are not named loss_*, and
    the shared trainer once refused its first step."""
    cfg = load_finetune_config(CPU_FINETUNE_CONFIG, tiny_finetune_overrides(
        fashiondet_tiny, tmp_path / "run", "scratch", 2, **{"model.arch": arch}))
    out = finetune(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {k for rec in log for k in rec.get("losses", {}) if k.startswith("loss_")}
    assert losses and all(math.isfinite(rec["losses"]["total_loss"]) for rec in log if "losses" in rec)
    if arch == "retinanet":
        assert {"loss_classification", "loss_bbox_regression"} <= losses
    assert out.results["val"]["bbox/AP"] >= 0
