"""The paper's best fine-tuning settings, by name.

Every preset is read from ``predet.config.paper_tables`` (the one transcription of the supplement),
so the numbers are typed once. A field the paper does not give is None, and
``preset_overrides`` leaves that config key out, so the caller's default stays in force.

Names: ``{dataset}/{model}/{pre-training}``, e.g. ``coco/mask_rcnn/predet_ig50m``;
``coco/mask_rcnn_r50/predet_ig50m``; ``coco/mask_rcnn_regnet/{predet,cls_imagenet,seer_1b}``;
``coco_{35k,10k,5k,1k}/mask_rcnn/row{1,2,3}`` for Table 2.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from predet.config import paper_tables
from predet.config.schedules import SCHEDULE_NAMES


@dataclass(frozen=True)
class Preset:
    """One row of the supplement's settings.

    ``lr`` is for batch 16 (scale it with ``schedules.scale_lr``). ``lr_mf`` (mask-head lr
    factor) is None for RetinaNet (no mask head) and where the paper does not give it (keep the
    default 1.0). ``weight_decay`` and ``schedule`` are None unless the paper gives them.
    """

    name: str
    lr: float
    gamma: float
    lr_mf: float | None
    weight_decay: float | None
    schedule: str | None
    source: str


PRETRAINING_SLUGS: dict[str, str] = {
    "from-scratch": "scratch",
    "cls-Imagenet": "cls_imagenet",
    "cls-IG50M": "cls_ig50m",
    "SEER-1B": "seer_1b",
    "Infomin": "infomin",
    "PreDet -ImageNet": "predet_imagenet",
    "PreDet -IG50M": "predet_ig50m",
}
DATASET_SLUGS: dict[str, str] = {"COCO": "coco", "LVIS-v1": "lvis"}
MODEL_SLUGS: dict[str, str] = {"mask-RCNN": "mask_rcnn", "Retinanet": "retinanet"}
REGNET_SLUGS: dict[str, str] = {"PreDet": "predet", "Imagenet pre-trained": "cls_imagenet",
                                "SEER-IG1B": "seer_1b"}

GRIDS: dict[str, dict[str, list]] = {
    "table1": {"solver.lr": paper_tables.SEARCH_GRIDS["table1"]["lr"],
               "solver.gamma": paper_tables.SEARCH_GRIDS["table1"]["gamma"],
               "optim.lr_mf": paper_tables.SEARCH_GRIDS["table1"]["lr_mf"]},
    "small_data": {"solver.lr": paper_tables.SEARCH_GRIDS["small_data"]["lr"],
                   "solver.gamma": paper_tables.SEARCH_GRIDS["small_data"]["gamma"],
                   "schedule": paper_tables.SEARCH_GRIDS["small_data"]["schedule"]},
}
GRID_SOURCES: dict[str, str] = dict(paper_tables.SEARCH_GRID_SOURCES)


def _table1_presets() -> list[Preset]:
    out = []
    for row in paper_tables.TABLE1:
        name = "/".join((DATASET_SLUGS[row["dataset"]], MODEL_SLUGS[row["model"]],
                         PRETRAINING_SLUGS[row["pre-training"]]))
        source = (f"Supplement Table 1: {row['dataset']}, {row['model']}, "
                  f"pre-training '{row['pre-training']}' (ResNext-101-32x8d + FPN)")
        out.append(Preset(name, row["lr"], row["gamma"], row["lr_mf"], None, None, source))
    return out


def _r50_presets() -> list[Preset]:
    out = []
    for row in paper_tables.R50_ROWS:
        name = f"coco/mask_rcnn_r50/{PRETRAINING_SLUGS[row['pre-training']]}"
        source = (f"Supplement §1, 'R50 + FPN for mask-RCNN' sentence: pre-training "
                  f"'{row['pre-training']}', lr and γ {row['lr']}, {row['gamma']}, mask-head lr not "
                  f"scaled (lr_mf {row['lr_mf']})")
        out.append(Preset(name, row["lr"], row["gamma"], row["lr_mf"], None, None, source))
    return out


def _regnet_presets() -> list[Preset]:
    out = []
    for row in paper_tables.REGNET_ROWS:
        name = f"coco/mask_rcnn_regnet/{REGNET_SLUGS[row['pre-training']]}"
        source = (f"Supplement §1, 'Regnet64 + FPN for mask-RCNN' paragraph: '{row['pre-training']}', "
                  f"weight decay {row['weight_decay']:g} (as per SEER); lr_mf not given "
                  f"(None: keep the default 1.0)")
        out.append(Preset(name, row["lr"], row["gamma"], None, row["weight_decay"], None, source))
    return out


def _table2_presets() -> list[Preset]:
    out = []
    for row in paper_tables.TABLE2:
        k = row["block_row"]
        name = f"coco_{row['dataset-size']}/mask_rcnn/row{k}"
        if row["pre-training"] is not None:
            label = f"pre-training '{row['pre-training']}' per the supplement text"
        else:
            label = "pre-training unlabeled in the supplement text (blank cell; label not guessed)"
        source = (f"Supplement Table 2: COCO subset of {row['dataset-size']} images, row {k} of 3 "
                  f"in its block, {label}; ResNext-101-32x8d + FPN mask-RCNN; lr_mf not given")
        out.append(Preset(name, row["lr"], row["gamma"], None, None, row["train schedule"], source))
    return out


def _build() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    for p in _table1_presets() + _r50_presets() + _regnet_presets() + _table2_presets():
        if p.name in presets:
            raise RuntimeError(f"duplicate preset name {p.name!r}")
        if p.schedule is not None and p.schedule not in SCHEDULE_NAMES:
            raise RuntimeError(f"preset {p.name!r} names unknown schedule {p.schedule!r}")
        presets[p.name] = p
    return presets


PRESETS: dict[str, Preset] = _build()


def list_presets() -> list[str]:
    """All preset names, in supplement order (Table 1, R50, RegNet, Table 2)."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The named preset; a typo gets the closest names back."""
    key = str(name).strip()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=5, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}?" if close else "no close match"
    raise ValueError(f"unknown preset {name!r}; {hint} ({len(PRESETS)} presets; see list_presets())")


def preset_overrides(name: str) -> dict:
    """Dotted config overrides for a preset; keys the paper does not give are left out."""
    p = get_preset(name)
    out: dict = {"solver.lr": p.lr, "solver.gamma": p.gamma}
    if p.lr_mf is not None:
        out["optim.lr_mf"] = p.lr_mf
    if p.weight_decay is not None:
        out["solver.weight_decay"] = p.weight_decay
    if p.schedule is not None:
        out["schedule"] = p.schedule
    return out
