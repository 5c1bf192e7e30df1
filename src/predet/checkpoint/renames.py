"""The one torchvision <-> Detectron2 name table, used by import (``transfer``) and export alike.

Detectron2 names carry absolute pyramid levels (``fpn_lateral3`` is C3), so the shift between a
two-stage FPN over C2..C5 and RetinaNet's FPN over C3..C5 falls out of the renaming.
"""

from __future__ import annotations

import re
from functools import lru_cache

from predet.config.choices import ARCHS

# Placeholders: ``{p}`` is one name component (``weight``, ``running_mean``...); any other
# ``{x}`` is an integer, written ``{x+k}`` or ``{x*k}`` on the side where it is offset/scaled.
# ``{i+F}`` is the pyramid level of FPN input ``i``: F = 2 for the two-stage FPN over C2..C5,
# F = 3 for RetinaNet's FPN over C3..C5.
RENAMES: tuple[tuple[str, str], ...] = (
    ("backbone.body.conv1.weight", "backbone.bottom_up.stem.conv1.weight"),
    ("backbone.body.bn1.{p}", "backbone.bottom_up.stem.conv1.norm.{p}"),
    ("backbone.body.layer{s}.{b}.conv{c}.weight", "backbone.bottom_up.res{s+1}.{b}.conv{c}.weight"),
    ("backbone.body.layer{s}.{b}.bn{c}.{p}", "backbone.bottom_up.res{s+1}.{b}.conv{c}.norm.{p}"),
    ("backbone.body.layer{s}.{b}.downsample.0.weight", "backbone.bottom_up.res{s+1}.{b}.shortcut.weight"),
    ("backbone.body.layer{s}.{b}.downsample.1.{p}", "backbone.bottom_up.res{s+1}.{b}.shortcut.norm.{p}"),
    ("backbone.fpn.inner_blocks.{i}.0.{p}", "backbone.fpn_lateral{i+F}.{p}"),
    ("backbone.fpn.inner_blocks.{i}.1.{p}", "backbone.fpn_lateral{i+F}.norm.{p}"),
    ("backbone.fpn.layer_blocks.{i}.0.{p}", "backbone.fpn_output{i+F}.{p}"),
    ("backbone.fpn.layer_blocks.{i}.1.{p}", "backbone.fpn_output{i+F}.norm.{p}"),
    ("backbone.fpn.extra_blocks.p{k}.{p}", "backbone.top_block.p{k}.{p}"),
    ("rpn.head.conv.0.0.{p}", "proposal_generator.rpn_head.conv.{p}"),
    ("rpn.head.cls_logits.{p}", "proposal_generator.rpn_head.objectness_logits.{p}"),
    ("rpn.head.bbox_pred.{p}", "proposal_generator.rpn_head.anchor_deltas.{p}"),
    ("roi_heads.box_head.fc6.{p}", "roi_heads.box_head.fc1.{p}"),
    ("roi_heads.box_head.fc7.{p}", "roi_heads.box_head.fc2.{p}"),
    ("roi_heads.box_predictor.cls_score.{p}", "roi_heads.box_predictor.cls_score.{p}"),
    ("roi_heads.box_predictor.bbox_pred.{p}", "roi_heads.box_predictor.bbox_pred.{p}"),
    ("roi_heads.mask_head.{i}.0.{p}", "roi_heads.mask_head.mask_fcn{i+1}.{p}"),
    ("roi_heads.mask_predictor.conv5_mask.{p}", "roi_heads.mask_head.deconv.{p}"),
    ("roi_heads.mask_predictor.mask_fcn_logits.{p}", "roi_heads.mask_head.predictor.{p}"),
    ("head.classification_head.conv.{i}.0.{p}", "head.cls_subnet.{i*2}.{p}"),
    ("head.classification_head.cls_logits.{p}", "head.cls_score.{p}"),
    ("head.regression_head.conv.{i}.0.{p}", "head.bbox_subnet.{i*2}.{p}"),
    ("head.regression_head.bbox_reg.{p}", "head.bbox_pred.{p}"),
)

_FIELD = re.compile(r"\{(\w+)(?:\*(\d+))?(?:\+(\d+|F))?\}")


def fpn_first_level(arch: str) -> int:
    """Pyramid level of the detector's first FPN input: C2 for two-stage detectors, C3 for RetinaNet."""
    if arch not in ARCHS:
        raise ValueError(f"unknown detector {arch!r}; choose one of {', '.join(ARCHS)}")
    return 3 if arch == "retinanet" else 2


def infer_arch(keys) -> str:
    """Guess the detector kind from torchvision state-dict keys (for files and bare state dicts)."""
    keys = list(keys)
    if any(k.startswith(("head.classification_head.", "backbone.fpn.extra_blocks.p6")) for k in keys):
        return "retinanet"
    if any(k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor.")) for k in keys):
        return "mask_rcnn"
    return "faster_rcnn"


def _compile(template: str, first: int):
    """A template -> (regex, {field: (scale, offset)}) for matching and its inverse for formatting."""
    fields: dict[str, tuple[int, int]] = {}
    pattern, pos = "", 0
    for m in _FIELD.finditer(template):
        name, mul, add = m.group(1), int(m.group(2) or 1), m.group(3) or "0"
        fields[name] = (mul, first if add == "F" else int(add))
        pattern += re.escape(template[pos:m.start()])
        pattern += rf"(?P<{name}>[A-Za-z_]\w*)" if name == "p" else rf"(?P<{name}>\d+)"
        pos = m.end()
    return re.compile(pattern + re.escape(template[pos:]) + r"\Z"), fields


@lru_cache(maxsize=None)
def _compiled_renames(first: int):
    return [(_compile(tv, first), _compile(d2, first), tv, d2) for tv, d2 in RENAMES]


def _rename(name: str, source, target_template: str, target_fields) -> str | None:
    regex, fields = source
    m = regex.match(name)
    if m is None:
        return None
    values = {}
    for key, (mul, add) in fields.items():
        if key == "p":
            values[key] = m.group(key)
            continue
        raw = int(m.group(key)) - add
        if raw < 0 or raw % mul:
            return None
        values[key] = raw // mul

    def fill(f: re.Match) -> str:
        key = f.group(1)
        mul, add = target_fields[key]
        return values[key] if key == "p" else str(values[key] * mul + add)

    return _FIELD.sub(fill, target_template)


def to_detectron2(name: str, arch: str = "mask_rcnn") -> str | None:
    """torchvision detector key -> Detectron2 key, or None when the table has no rule for it."""
    for tv, d2, _, d2_template in _compiled_renames(fpn_first_level(arch)):
        out = _rename(name, tv, d2_template, d2[1])
        if out is not None:
            return out
    return None


def from_detectron2(name: str, arch: str = "mask_rcnn") -> str | None:
    """Detectron2 key -> torchvision detector key, or None (the inverse of :func:`to_detectron2`)."""
    for tv, d2, tv_template, _ in _compiled_renames(fpn_first_level(arch)):
        out = _rename(name, d2, tv_template, tv[1])
        if out is not None:
            return out
    return None


# Caffe2 / Detectron1 ResNet names (the MSRA ImageNet ``R-50.pkl``), as Detectron2 converts them.
_C2_SUFFIXES = (("_bn_s", ".norm.weight"), ("_bn_b", ".norm.bias"), ("_bn_rm", ".norm.running_mean"),
                ("_bn_riv", ".norm.running_var"), ("_w", ".weight"), ("_b", ".bias"))

_C2_BLOCK = re.compile(r"res(\d)_(\d+)_branch(2a|2b|2c|1)")

_C2_BRANCH = {"2a": "conv1", "2b": "conv2", "2c": "conv3", "1": "shortcut"}


def c2_to_detectron2(name: str) -> str | None:
    """``res2_0_branch2a_bn_s`` -> ``backbone.bottom_up.res2.0.conv1.norm.weight``; None if not ResNet."""
    for c2, d2 in _C2_SUFFIXES:
        if name.endswith(c2):
            stem, suffix = name[: -len(c2)], d2
            break
    else:
        return None
    if stem in ("conv1", "res_conv1"):
        return "backbone.bottom_up.stem.conv1" + suffix
    m = _C2_BLOCK.fullmatch(stem)
    if m is None:
        return None
    return f"backbone.bottom_up.res{m.group(1)}.{m.group(2)}.{_C2_BRANCH[m.group(3)]}{suffix}"
