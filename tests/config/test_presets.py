"""Schedules, presets and paper tables against a second, hand-typed transcription of the supplement."""

import pytest

from predet.config import paper_tables
from predet.config.presets import GRIDS, get_preset, list_presets, preset_overrides
from predet.config.schedules import (
    SCHEDULE_NAMES,
    get_schedule,
    resolve_schedule,
    scale_lr,
)

# ---------------------------------------------------------------- schedules

DOCUMENTED = {
    "1x": (90_000, (60_000, 80_000)),
    "2x": (180_000, (120_000, 160_000)),
    "3x": (270_000, (180_000, 240_000)),
    "6x": (540_000, (360_000, 480_000)),
    "9x": (810_000, (540_000, 720_000)),
    "60k": (60_000, (40_000, 55_000)),
    "70k": (70_000, (50_000, 65_000)),
    "130k": (130_000, (100_000, 120_000)),
    "90k": (90_000, (60_000, 80_000)),
    "540k": (540_000, (360_000, 480_000)),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_named_schedule_has_documented_milestones(name):
    s = resolve_schedule(name)
    assert (s.max_iters, s.milestones) == DOCUMENTED[name]
    assert s.base_batch == 16 and s.documented and s.source


def test_80k_is_flagged_undocumented():
    s = resolve_schedule("80k")
    assert not s.documented
    assert s.max_iters == 80_000 and s.milestones == (53_333, 71_111)
    assert "UNDOCUMENTED" in s.source


@pytest.mark.parametrize("alias", ["1×", "1X", " 1x "])
def test_schedule_aliases(alias):
    assert resolve_schedule(alias) == resolve_schedule("1x")


def test_every_schedule_name_resolves():
    assert set(DOCUMENTED) | {"80k"} == set(SCHEDULE_NAMES)


def test_scaling_with_batch_size():
    s = resolve_schedule("1x", batch_size=8)
    assert s.max_iters == 180_000 and s.milestones == (120_000, 160_000) and s.base_batch == 8
    s = resolve_schedule("1x", batch_size=32)
    assert s.max_iters == 45_000 and s.milestones == (30_000, 40_000)


def test_scaling_with_schedule_scale():
    s = resolve_schedule("1x", schedule_scale=0.01)
    assert s.max_iters == 900 and s.milestones == (600, 800)
    s = resolve_schedule("60k", batch_size=2, schedule_scale=0.01)
    assert s.max_iters == 4800 and s.milestones == (3200, 4400)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("batch,scale", [(1, 1.0), (4, 0.001), (16, 1e-4), (64, 1e-5), (3, 0.0137)])
def test_scaled_milestones_stay_increasing_and_inside_the_run(name, batch, scale):
    s = resolve_schedule(name, batch_size=batch, schedule_scale=scale)
    assert s.max_iters >= 1
    assert all(0 < m < s.max_iters for m in s.milestones)
    assert all(a < b for a, b in zip(s.milestones, s.milestones[1:]))


def test_tiny_run_still_has_an_iteration():
    s = resolve_schedule("1x", batch_size=64, schedule_scale=1e-9)
    assert s.max_iters == 1 and s.milestones == ()


def test_solver_overrides_of_a_schedule():
    assert resolve_schedule("2x", schedule_scale=0.001).solver_overrides() == {
        "solver.max_iters": 180, "solver.milestones": [120, 160]}


def test_scale_lr_is_linear():
    assert scale_lr(0.02, 16) == pytest.approx(0.02)
    assert scale_lr(0.02, 8) == pytest.approx(0.01)
    assert scale_lr(0.02, 2) == pytest.approx(0.0025)
    assert scale_lr(0.01, 64, base_batch=32) == pytest.approx(0.02)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as err:
        resolve_schedule("4x")
    for name in ("1x", "2x", "60k", "130k"):
        assert name in str(err.value)
    with pytest.raises(ValueError):
        get_schedule("")


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"schedule_scale": 0.0}, {"schedule_scale": -1}])
def test_bad_scaling_arguments(kwargs):
    with pytest.raises(ValueError):
        resolve_schedule("1x", **kwargs)


# ---------------------------------------------------------------- presets (hand transcription)

SLUG_ORDER = ["scratch", "cls_imagenet", "cls_ig50m", "seer_1b", "infomin", "predet_imagenet", "predet_ig50m"]
# Supplement Table 1, typed again by hand: (lr, γ, lr_mf) per pre-training in row order.
TABLE1_BY_HAND = {
    "coco/mask_rcnn": [(0.02, 0.1, 4.0), (0.02, 0.1, 1.0), (0.01, 0.15, 1.0), (0.02, 0.1, 4.0),
                       (0.02, 0.1, 4.0), (0.02, 0.1, 4.0), (0.01, 0.1, 4.0)],
    "lvis/mask_rcnn": [(0.02, 0.1, 4.0), (0.02, 0.1, 1.0), (0.01, 0.15, 1.0), (0.02, 0.1, 4.0),
                       (0.02, 0.1, 4.0), (0.02, 0.1, 4.0), (0.005, 0.2, 4.0)],
    "coco/retinanet": [(0.02, 0.1, None), (0.01, 0.1, None), (0.01, 0.1, None), (0.01, 0.1, None),
                       (0.01, 0.1, None), (0.01, 0.1, None), (0.01, 0.1, None)],
}
TABLE1_CASES = [(f"{block}/{slug}", *vals) for block, rows in TABLE1_BY_HAND.items()
                for slug, vals in zip(SLUG_ORDER, rows)]
LABELS = {"scratch": "from-scratch", "cls_imagenet": "cls-Imagenet", "cls_ig50m": "cls-IG50M",
          "seer_1b": "SEER-1B", "infomin": "Infomin", "predet_imagenet": "PreDet -ImageNet",
          "predet_ig50m": "PreDet -IG50M"}


@pytest.mark.parametrize("name,lr,gamma,lr_mf", TABLE1_CASES)
def test_table1_presets(name, lr, gamma, lr_mf):
    p = get_preset(name)
    assert (p.lr, p.gamma, p.lr_mf) == (lr, gamma, lr_mf)
    assert p.weight_decay is None and p.schedule is None
    dataset = {"coco": "COCO", "lvis": "LVIS-v1"}[name.split("/")[0]]
    model = {"mask_rcnn": "mask-RCNN", "retinanet": "Retinanet"}[name.split("/")[1]]
    assert p.source == (f"Supplement Table 1: {dataset}, {model}, "
                        f"pre-training '{LABELS[name.split('/')[2]]}' (ResNext-101-32x8d + FPN)")


def test_r50_preset():
    p = get_preset("coco/mask_rcnn_r50/predet_ig50m")
    assert (p.lr, p.gamma, p.lr_mf, p.weight_decay, p.schedule) == (0.01, 0.15, 1.0, None, None)
    assert "R50 + FPN" in p.source


@pytest.mark.parametrize("slug,lr", [("predet", 0.01), ("cls_imagenet", 0.02), ("seer_1b", 0.02)])
def test_regnet_presets(slug, lr):
    p = get_preset(f"coco/mask_rcnn_regnet/{slug}")
    assert (p.lr, p.gamma, p.weight_decay, p.lr_mf, p.schedule) == (lr, 0.1, 5e-5, None, None)
    assert "Regnet64 + FPN" in p.source and "lr_mf not given" in p.source
    assert preset_overrides(p.name) == {"solver.lr": lr, "solver.gamma": 0.1, "solver.weight_decay": 5e-5}


# Supplement Table 2, typed again by hand: (size, row in block, schedule, lr, γ).
TABLE2_BY_HAND = [
    ("35k", 1, "540k", 0.04, 0.02), ("35k", 2, "90k", 0.04, 0.02), ("35k", 3, "90k", 0.04, 0.02),
    ("10k", 1, "90k", 0.04, 0.02), ("10k", 2, "60k", 0.03, 0.02), ("10k", 3, "60k", 0.02, 0.1),
    ("5k", 1, "80k", 0.02, 0.1), ("5k", 2, "60k", 0.02, 0.1), ("5k", 3, "60k", 0.02, 0.1),
    ("1k", 1, "60k", 0.02, 0.1), ("1k", 2, "60k", 0.02, 0.1), ("1k", 3, "60k", 0.02, 0.1),
]


@pytest.mark.parametrize("size,k,schedule,lr,gamma", TABLE2_BY_HAND)
def test_table2_presets(size, k, schedule, lr, gamma):
    p = get_preset(f"coco_{size}/mask_rcnn/row{k}")
    assert (p.schedule, p.lr, p.gamma, p.lr_mf, p.weight_decay) == (schedule, lr, gamma, None, None)
    assert p.source.startswith("Supplement Table 2:") and f"row {k} of 3" in p.source
    if k == 1:
        assert "'from-scratch' per the supplement text" in p.source
    else:
        assert "unlabeled in the supplement text" in p.source and "from-scratch" not in p.source
    resolve_schedule(p.schedule)  # every Table 2 schedule is a known name
    assert preset_overrides(p.name) == {"solver.lr": lr, "solver.gamma": gamma, "schedule": schedule}


def test_preset_count_and_overrides():
    assert len(list_presets()) == 21 + 1 + 3 + 12
    assert preset_overrides("coco/mask_rcnn/predet_ig50m") == {
        "solver.lr": 0.01, "solver.gamma": 0.1, "optim.lr_mf": 4.0}
    assert "optim.lr_mf" not in preset_overrides("coco/retinanet/predet_ig50m")


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError) as err:
        get_preset("coco/mask_rcnn/predet_ig50")
    msg = str(err.value)
    assert "coco/mask_rcnn/predet_ig50m" in msg and "37 presets" in msg


def test_grids_are_the_supplement_search_sets():
    assert GRIDS["table1"] == {"solver.lr": [0.005, 0.01, 0.02, 0.03, 0.04],
                               "solver.gamma": [0.1, 0.15, 0.2], "optim.lr_mf": [1.0, 4.0]}
    assert GRIDS["small_data"] == {"solver.lr": [0.04, 0.03, 0.02], "solver.gamma": [0.02, 0.05, 0.1],
                                   "schedule": ["60k", "70k", "130k", "1x", "2x"]}
    for sched in GRIDS["small_data"]["schedule"]:
        resolve_schedule(sched)


# ---------------------------------------------------------------- Tables 3 and 4


def test_table1_and_2_fill_down():
    t1 = paper_tables.TABLE1
    assert len(t1) == 21 and all(r["dataset"] and r["model"] for r in t1)
    assert (t1[13]["dataset"], t1[13]["model"], t1[13]["lr"]) == ("LVIS-v1", "mask-RCNN", 0.005)
    t2 = paper_tables.TABLE2
    assert [r["pre-training"] for r in t2[:3]] == ["from-scratch", None, None]
    assert [r["dataset-size"] for r in t2[3:6]] == ["10k"] * 3


def test_table3_transcription():
    t = paper_tables.TABLE3
    assert len(t) == 14 and len(paper_tables.TABLE3_COLUMNS) == 11
    assert all(set(r) == set(paper_tables.TABLE3_COLUMNS) for r in t)
    assert (t[0]["pre-training"], t[0]["sched."], t[0]["mask_rcnn_ap_bbox"]) == ("scratch", "3×", 43.3)
    assert (t[2]["pre-training"], t[2]["sched."], t[2]["retinanet_ap75_bbox"]) == ("scratch", "9×", 43.4)
    assert t[4]["pre-training"] == "cls-Imagenet" and t[4]["retinanet_ap_bbox"] is None
    assert t[6]["pre-training"] == "SEER-IG1B" and t[6]["mask_rcnn_ap50_mask"] == 62.4
    assert t[9]["pre-training"] == "Infomin" and t[9]["mask_rcnn_ap75_mask"] == 43.6
    assert t[12]["pre-training"] == "PreDet -Imagenet" and t[12]["retinanet_ap50_bbox"] == 63.3
    assert t[13]["pre-training"] == "PreDet -IG50M"
    assert [t[13][k] for k in list(paper_tables.TABLE3_COLUMNS)[2:]] == [
        47.1, 68.2, 51.6, 41.7, 65.2, 45.1, 45.1, 67.8, 50.6]


def test_table4_transcription():
    t = paper_tables.TABLE4
    assert len(t) == 12 and len(paper_tables.TABLE4_COLUMNS) == 8
    assert (t[0]["pre-training"], t[0]["sched."], t[0]["mask_rcnn_ap_bbox"]) == ("scratch", "2×", 22.6)
    assert (t[2]["pre-training"], t[2]["sched."], t[2]["mask_rcnn_ap_mask"]) == ("scratch", "6×", 26.9)
    assert (t[5]["pre-training"], t[5]["sched."], t[5]["mask_rcnn_ap75_mask"]) == ("cls-Imagenet", "3×", 26.2)
    assert t[7]["pre-training"] == "SEER-IG1B" and t[7]["mask_rcnn_ap75_bbox"] == 30.8
    assert t[9]["pre-training"] == "Infomin" and t[9]["mask_rcnn_ap50_bbox"] == 41.6
    assert t[10]["pre-training"] == "PreDet -ImageNet" and t[10]["mask_rcnn_ap50_mask"] == 38.6
    assert t[11]["pre-training"] == "PreDet -IG50M" and t[11]["mask_rcnn_ap_mask"] == 29.2


def test_format_table_markdown():
    text = paper_tables.format_table(paper_tables.TABLE3, paper_tables.TABLE3_COLUMNS)
    lines = text.splitlines()
    assert lines[0].startswith("| pre-training | sched. | mask-RCNN AP^bbox")
    assert lines[1].count("---") == 11 and len(lines) == 2 + 14
    assert "| PreDet -IG50M | 1× | 47.1 |" in text
    assert "| cls-Imagenet | 3× | 44.3 | 64.5 | 48.6 | 39.5 | 61.7 | 42.6 | - | - | - |" in text
    plain = paper_tables.format_table([{"a": 1, "b": None}], ["a", "b"])
    assert plain == "| a | b |\n|---|---|\n| 1 | - |"
    assert "Table 4." in paper_tables.format_paper_table("table4")
