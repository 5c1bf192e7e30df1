"""End-to-end pre-training on a tiny FashionDet set: loss goes down, resume is exact, DDP, bad data."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import (
    CPU_PRETRAIN_CONFIG,
    CrashAt,
    tiny_pretrain_config,
    tiny_pretrain_overrides,
)

from predet.checkpoint.io import latest_checkpoint, load_checkpoint
from predet.cli import main as cli_main
from predet.config import shipped_configs
from predet.engine.metrics import read_metrics
from predet.pretrain import load_pretrain_config, pretrain


@pytest.fixture(scope="module")
def weak_set(fashiondet_tiny) -> Path:
    return fashiondet_tiny / "weak"


def total_loss(record: dict) -> float:
    return sum(v for k, v in record["losses"].items() if k.startswith("loss"))


def test_training_lowers_the_loss(weak_set, tmp_path):
    cfg = tiny_pretrain_config(weak_set, tmp_path / "run", 30, **{"solver.lr": 0.02, "data.views.jitter": 0.0})
    result = pretrain(cfg)
    assert result.iteration == 30
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "losses" in r]
    first = sum(total_loss(r) for r in records[:5]) / 5
    last = sum(total_loss(r) for r in records[-5:]) / 5
    assert last < first, (first, last)
    assert {"loss_cls", "loss_crpn_score", "loss_crpn_reg", "loss_nce", "loss_roi_reg"} <= set(records[-1]["losses"])
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["extra_state"]["vocab"] == json.loads((weak_set / "vocab.json").read_text())


def test_stopped_and_resumed_run_equals_uninterrupted_run(weak_set, tmp_path, monkeypatch):
    straight = pretrain(tiny_pretrain_config(weak_set, tmp_path / "straight", 30))
    import predet.pretrain as pretrain_module

    real_train = pretrain_module.train
    monkeypatch.setattr(pretrain_module, "train", lambda *a, **k: real_train(*a, **{**k, "hooks": [CrashAt(20)]}))
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_pretrain_config(weak_set, tmp_path / "resumed", 30))
    monkeypatch.setattr(pretrain_module, "train", real_train)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint_0000020.pth"
    resumed = pretrain(tiny_pretrain_config(weak_set, tmp_path / "resumed", 30, **{"train.resume": "true"}))
    a = load_checkpoint(straight.last_checkpoint)["model"]
    b = load_checkpoint(resumed.last_checkpoint)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SaveWeights:
    def __init__(self, out):
        self.out = out

    def after_train(self, state):
        # Parameters, not BN running stats: DDP broadcasts rank 0's buffers at each forward,
        # and checkpoints are written by rank 0.
        params = {k: v.detach() for k, v in state.model.named_parameters()}
        torch.save(params, Path(self.out) / f"rank{state.rank}.pt")


def _ddp_worker(rank, world, port, weak, run_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import predet.pretrain as pretrain_module

    real_train = pretrain_module.train
    pretrain_module.train = lambda *a, **k: real_train(*a, **{**k, "hooks": [SaveWeights(out)]})
    cfg = tiny_pretrain_config(Path(weak), Path(run_dir), 4, **{"train.batch_size": 2, "train.checkpoint_period": 100})
    pretrain_module.pretrain(cfg)


def test_two_process_gloo_ddp_keeps_ranks_equal(weak_set, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(weak_set), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert len(w0) > 90
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    assert latest_checkpoint(tmp_path / "run") is not None


def _weak_copy(weak_set, tmp_path, n, corrupt=(), missing=()):
    """The first ``n`` images of the weak set in a folder of their own, some damaged."""
    lines = (weak_set / "labels.jsonl").read_text().splitlines()[:n]
    data = tmp_path / "weak"
    (data / "images").mkdir(parents=True)
    for line in lines:
        rel = json.loads(line)["image"]
        shutil.copy(weak_set / rel, data / rel)
    for i in corrupt:
        (data / json.loads(lines[i])["image"]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for i in missing:
        (data / json.loads(lines[i])["image"]).unlink()
    (data / "labels.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(weak_set / "vocab.json", data / "vocab.json")
    return data, [str(data / json.loads(lines[i])["image"]) for i in (*corrupt, *missing)]


def test_corrupt_and_missing_images_are_skipped_and_counted_per_image(weak_set, tmp_path):
    data, bad = _weak_copy(weak_set, tmp_path, 4, corrupt=[1], missing=[2])
    # 4 images, batch 4, 2 iterations: two epochs, so each bad image is read twice, counted once.
    result = pretrain(tiny_pretrain_config(data, tmp_path / "run", 2, **{"train.max_skipped_fraction": 0.6}))
    assert result.iteration == 2
    assert result.skipped == 2
    skipped = [json.loads(l) for l in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    reasons = {r["path"]: r["reason"] for r in skipped}
    assert sorted(reasons) == sorted(bad)
    assert reasons[bad[1]] == "not found" and reasons[bad[0]] != "not found"


def test_more_unreadable_images_than_allowed_stop_the_run(weak_set, tmp_path):
    from predet.errors import DataError

    data, bad = _weak_copy(weak_set, tmp_path, 8, corrupt=[2], missing=[5])  # 25 % > 10 %
    with pytest.raises(DataError) as err:
        pretrain(tiny_pretrain_config(data, tmp_path / "run", 2))
    msg = str(err.value)
    assert "2 of 8 image reads failed" in msg and "max_skipped_fraction=0.1" in msg
    assert all(path in msg for path in bad)
    assert not (tmp_path / "run" / "checkpoints" / "model_final.pth").exists()


@pytest.mark.parametrize("fraction,fragment", [(0.1, "8 of 8 image reads failed"),
                                               (1.0, r"no optimizer step in 2 iteration\(s\)")])
def test_a_run_whose_images_are_all_unreadable_is_an_error(weak_set, tmp_path, fraction, fragment):
    from predet.errors import DataError

    labels = tmp_path / "elsewhere" / "labels.jsonl"  # relative image paths now point nowhere
    labels.parent.mkdir()
    shutil.copy(weak_set / "labels.jsonl", labels)
    cfg = tiny_pretrain_config(weak_set, tmp_path / "run", 2,
                               **{"data.train": labels, "train.max_skipped_fraction": fraction})
    with pytest.raises(DataError, match=fragment) as err:
        pretrain(cfg)
    assert "not found" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints" / "model_final.pth").exists()


def test_cli_pretrain_smoke_and_bad_inputs(weak_set, tmp_path, capsys):
    args = ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *tiny_pretrain_overrides(weak_set, tmp_path / "run", 2)]
    assert cli_main(args) == 0
    assert "finished at iteration 2" in capsys.readouterr().out

    assert cli_main(["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), "solver.lr_typo=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'solver.lr_typo'" in err and "solver.lr" in err and "model.backbone" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "labels": ["Bag"]}\n{"image": "b.png", "labels": "Bag"}\n')
    assert cli_main(["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), f"data.train={bad}", "data.vocab="]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and ":2" in err and "labels" in err


def test_every_shipped_pretrain_config_loads():
    for path in sorted(CPU_PRETRAIN_CONFIG.parent.glob("*.yaml")):
        cfg = load_pretrain_config(path)
        assert cfg.model.backbone and cfg.solver.max_iters > 0, path


def test_pretext_diagnostics_are_one_when_the_answer_is_known():
    from predet.evaluation.pretext import recall_at_iou, top1_accuracy

    boxes = torch.tensor([[[0, 0, 10, 10.0], [5, 5, 30, 20.0]]])
    assert recall_at_iou(boxes, boxes) == 1.0
    assert recall_at_iou(boxes + torch.tensor([20.0, 0, 20, 0]), boxes) == 0.0
    sim = torch.eye(4) + 0.1 * torch.rand(4, 4)
    positive = torch.eye(4, dtype=torch.bool)
    assert top1_accuracy(sim, positive) == 1.0
    assert top1_accuracy(-sim, positive) == 0.0


def test_weight_change_is_zero_without_updates_and_positive_after_training(weak_set, tmp_path):
    """The rebuilt initialisation is the one training started from: lr 0 leaves every part at 0."""
    from predet.pretrain import weight_change

    pretrain(tiny_pretrain_config(weak_set, tmp_path / "frozen", 2, **{"solver.lr": 0.0}))
    frozen = weight_change(tmp_path / "frozen" / "checkpoints" / "model_final.pth")
    assert {"backbone.body.conv1", "backbone.body.layer4", "backbone.fpn", "box_head.fc6", "crpn.trunk"} <= set(frozen)
    assert all(v == 0.0 for v in frozen.values()), frozen
    pretrain(tiny_pretrain_config(weak_set, tmp_path / "trained", 3))
    trained = weight_change(tmp_path / "trained" / "checkpoints" / "model_final.pth")
    assert trained.keys() == frozen.keys()
    assert all(v > 0.0 for k, v in trained.items() if k.startswith("backbone")), trained


def test_pretext_diagnostics_are_logged_on_heldout_pairs_beside_their_floors(weak_set, tmp_path):
    cfg = tiny_pretrain_config(weak_set, tmp_path / "run", 4, **{"data.val": weak_set / "heldout_clean.jsonl",
                                                                "train.eval_period": 2})
    result = pretrain(cfg)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "pretext/crpn_recall@0.5" in r]
    assert [r["iteration"] for r in records] == [2, 4]
    signals = ["crpn_recall@0.5", "crpn_recall@0.5_other_query", "crpn_recall@0.5_best_anchor", "nce_top1",
               "nce_top1_chance", "cls_mAP", "cls_mAP_constant"]
    for r in records:
        assert all(0.0 <= r[f"pretext/{k}"] <= 1.0 for k in signals), r
    assert result.iteration == 4


def test_weak_label_map_and_its_constant_floor():
    from predet.evaluation.pretext import constant_predictor_map, mean_average_precision

    torch.manual_seed(0)
    targets = (torch.rand(400, 6) < torch.linspace(0.1, 0.6, 6)).float()
    assert mean_average_precision(targets + 0.01 * torch.rand(400, 6), targets) == 1.0
    assert mean_average_precision(-targets, targets) < constant_predictor_map(targets)
    noise = sum(mean_average_precision(torch.rand(400, 6), targets) for _ in range(20)) / 20
    assert abs(noise - constant_predictor_map(targets)) < 0.02  # a random ranking scores the floor
    assert constant_predictor_map(targets) == pytest.approx(targets.mean(0).mean().item())


def test_crpn_recall_floors_catch_a_crpn_that_ignores_its_query():
    from predet.evaluation.pretext import (
        best_fixed_anchor_recall,
        other_query_boxes,
        recall_at_iou,
    )

    torch.manual_seed(0)
    xy = torch.rand(3, 8, 2) * 100
    targets = torch.cat([xy, xy + 10 + torch.rand(3, 8, 2) * 20], dim=2)
    # A CRPN that answers each query: perfect recall, and far less with another query's box.
    assert recall_at_iou(targets, targets) == 1.0
    assert recall_at_iou(other_query_boxes(targets), targets) < 0.3
    # One that gives every query of an image the same box: the cross-query floor equals it.
    same = targets[:, :1].expand_as(targets)
    assert recall_at_iou(other_query_boxes(same), targets) == recall_at_iou(same, targets)
    anchors = torch.cat([targets[0, :1], torch.tensor([[500.0, 500, 510, 510]])])
    assert best_fixed_anchor_recall(anchors, targets[0, :1].expand(3, 1, 4)) == 1.0
    assert best_fixed_anchor_recall(anchors, targets) < 0.2


def test_per_view_batch_norm_normalises_each_view_with_its_own_statistics():
    from helpers import tiny_model, two_view_batch

    batch = two_view_batch(n=2, size=64)
    model = tiny_model(per_view_bn=True).train()
    c5, fpn = model.features(batch["view1"], batch["view2"])
    c5_1, _ = model.features(batch["view1"])
    c5_2, _ = model.features(batch["view2"])
    torch.testing.assert_close(c5, torch.cat([c5_1, c5_2]))
    model.cfg.per_view_bn = False
    shared, _ = model.features(batch["view1"], batch["view2"])
    assert not torch.allclose(shared, c5)


def test_a_kill_during_the_pretext_evaluation_loses_no_record(weak_set, tmp_path, monkeypatch):
    """Killed after checkpoint 2 but before its pretext evaluation: the resumed run redoes it."""
    import predet.pretrain as pretrain_module

    real_train = pretrain_module.train
    monkeypatch.setattr(pretrain_module, "train",
                        lambda *a, **k: real_train(*a, **{**k, "hooks": [CrashAt(2), *k["hooks"]]}))
    cfg = tiny_pretrain_config(weak_set, tmp_path / "run", 3, **{
        "data.val": weak_set / "heldout.jsonl", "train.eval_period": 2, "train.checkpoint_period": 2})
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(pretrain_module, "train", real_train)

    def pretext_iterations():
        return [r["iteration"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                if "pretext/nce_top1" in r]

    assert pretext_iterations() == []
    pretrain(tiny_pretrain_config(weak_set, tmp_path / "run", 3, **{
        "data.val": weak_set / "heldout.jsonl", "train.eval_period": 2, "train.checkpoint_period": 2,
        "train.resume": "true"}))
    assert pretext_iterations() == [2, 3]


GPU_PRETRAIN_CONFIGS = [n for n in shipped_configs() if n.startswith("pretrain/") and "_gpu" in n]


@pytest.mark.parametrize("name", GPU_PRETRAIN_CONFIGS)
def test_gpu_pretraining_configs_carry_the_recipe_that_learned(name):
    # The CPU recipe is the one measured to learn (every held-out signal beat its floors); a GPU
    # config may change sizes, not the CRPN targets, init, clipping or the lr per image.
    cpu, gpu = load_pretrain_config(CPU_PRETRAIN_CONFIG), load_pretrain_config(name)
    for key in ("crpn_fg_iou", "crpn_bg_iou", "crpn_anchors_per_query", "crpn_pos_fraction", "crpn_init_std"):
        assert getattr(gpu.model, key) == getattr(cpu.model, key), key
    assert gpu.solver.clip_grad_norm == cpu.solver.clip_grad_norm
    assert gpu.reference_batch > 0
    assert gpu.solver.lr / gpu.reference_batch == pytest.approx(cpu.solver.lr / cpu.train.batch_size)
    # RoIAlign's level mapping scaled to the view size as in the CPU recipe's 64 px -> 64
    assert gpu.data.views.size == 800 and gpu.model.roi_canonical_scale == 224
    # the most expensive run a user makes logs its held-out signals on a bounded set, keeps few checkpoints
    assert gpu.data.val and gpu.train.eval_period > 0 and 0 < gpu.data.val_pairs <= 512
    assert 0 < gpu.data.val_max_images <= 1024 and 0 < gpu.train.keep_checkpoints <= 5
    assert gpu.solver.amp == "bf16" and gpu.model.norm == "syncbn"
    assert gpu.model.head_dtype == "float32"  # under autocast, autocast decides every layer's dtype
    if name.endswith("_pilot"):
        full = load_pretrain_config(name.removesuffix("_pilot"))
        assert gpu.solver.max_iters <= 2500 and gpu.solver.lr == full.solver.lr
        assert gpu.solver.warmup_iters == full.solver.warmup_iters and gpu.model == full.model
        assert gpu.solver.schedule == "step" and not gpu.solver.milestones  # the long run's start: no decay
        assert gpu.solver.max_iters // gpu.train.eval_period >= 4
