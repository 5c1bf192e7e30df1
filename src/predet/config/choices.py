"""The names a config may choose from: backbones, norms, detector architectures, and the
``init=`` values that load no weights. Torch-free, so the sweep and the checks can read them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d")

REGNETS = ("regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
           "regnet_y_16gf", "regnet_y_32gf", "regnet_y_64gf", "regnet_x_400mf", "regnet_x_3_2gf", "regnet_x_8gf")

BACKBONES = RESNETS + REGNETS

NORMS = ("bn", "syncbn", "frozen_bn", "gn")

ARCHS = ("mask_rcnn", "faster_rcnn", "retinanet")

LR_SCHEDULES = ("step", "cosine")  # how the lr decays after its warm-up

SCRATCH_INITS = ("scratch", "random")  # init= values that load no weights (torch-free home: sweep reads it)


def pretraining_label(init: Any) -> str:
    """A short name for a pre-training: its run's folder (the parent of ``checkpoints/``).

    ``runs/pretrain/predet_r18/checkpoints/model_final.pth`` -> ``predet_r18``; an
    intermediate ``checkpoint_0001000.pth`` adds ``-it1000``; a file elsewhere (an external
    SEER or torchvision file) is named by its stem; ``scratch``/``random`` -> ``scratch``.
    """
    text = str(init).strip()
    if not text or text in SCRATCH_INITS:
        return "scratch"
    path = Path(text)
    stem = path.name.split(".")[0] or path.name
    if path.parent.name != "checkpoints" or not path.parent.parent.name:
        return stem
    label = path.parent.parent.name
    step = re.fullmatch(r"checkpoint_(\d+)", stem)
    if step:
        label += f"-it{int(step.group(1))}"
    elif not stem.startswith("model_final"):
        label += f"-{stem}"
    return label
