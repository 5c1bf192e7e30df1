"""Initialising a detector from pre-trained weights (method.md §2 "Transfer").

``load_init_weights`` accepts a PreDet pre-training checkpoint, a torchvision detector or
classification backbone file (also with ``module.``/``encoder.``-style prefixes, as SEER, InfoMin
and MoCo releases ship them), a ``.safetensors`` file, and Detectron2 weights (``.pth`` or the
model-zoo ``.pkl``, including Caffe2-named ResNet ImageNet weights).

Every source is read by ``predet.checkpoint.formats`` and renamed into one common namespace,
Detectron2's names, through the single torchvision <-> Detectron2 table of
``predet.checkpoint.renames``, which the export to Detectron2 uses as well.

What transfers is what PreDet pre-trains: backbone body, FPN, RPN 3x3 trunk and the box head FCs.
Everything else (class predictors, mask head, RPN/RetinaNet output layers, PreDet's pretext heads)
starts fresh, whatever the source holds, so that all initialisations compare fairly.

Nothing unpickles freely (``formats``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from predet.checkpoint.formats import (
    FORMAT_NAMES,
    backbone_prefix,
    detect_format,
    flat_state_dict,
    read_weight_file,
)
from predet.checkpoint.renames import (
    c2_to_detectron2,
    fpn_first_level,
    infer_arch,
    to_detectron2,
)
from predet.config import SCRATCH_INITS, ConfigError
from predet.engine.distributed import unwrap_model
from predet.errors import CheckpointError, InputNotFound

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# What transfers.

TRANSFERRED = ("backbone.", "proposal_generator.rpn_head.conv.", "roi_heads.box_head.")
CLASS_SPECIFIC = re.compile(
    r"(roi_heads\.box_predictor\.|roi_heads\.mask_head\.predictor\.|head\.cls_score\.|cls_head\."
    r"|backbone\.body\.fc\.|fc1000)"
)
PRETEXT = ("crpn.score_generator.", "crpn.delta_generator.", "roi_head.")


def _not_transferred(canonical: str) -> str | None:
    """Why a source tensor never transfers, or None when it may."""
    if CLASS_SPECIFIC.match(canonical):
        return "not transferred (class-specific)"
    if canonical.startswith(PRETEXT):
        return "not transferred (pretext head)"
    if not canonical.startswith(TRANSFERRED):
        return "not transferred (starts fresh)"
    return None


def _predet_to_torchvision(name: str) -> str:
    """PreDet module names -> torchvision detector names (its trunk is ``rpn.head.conv``)."""
    for old, new in (("crpn.trunk.", "rpn.head.conv."), ("box_head.", "roi_heads.box_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _canonical_source(state: dict, fmt: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Source key -> common (Detectron2) name; keys outside the backbone wrapper are set aside."""
    names, outside = {}, []
    prefix = backbone_prefix(state) if fmt == "backbone" else None
    src_arch = infer_arch(state) if fmt == "torchvision_detector" else "mask_rcnn"
    for key in state:
        if fmt == "detectron2":
            names[key] = key
        elif fmt == "caffe2":
            names[key] = c2_to_detectron2(key) or key
        elif fmt == "backbone":
            if not key.startswith(prefix):
                outside.append((key, f"no counterpart (outside {prefix!r})"))
                continue
            tv = "backbone.body." + key[len(prefix):]
            names[key] = to_detectron2(tv) or tv
        else:
            tv = _predet_to_torchvision(key) if fmt == "predet" else key
            names[key] = to_detectron2(tv, src_arch) or tv
    return names, outside


def _fill_folded_bn(state: dict) -> dict:
    """Caffe2 ResNets fold BN into scale/shift: add mean 0, var 1 - eps so FrozenBN applies them as is."""
    state = dict(state)
    for key, value in list(state.items()):
        if key.endswith("_bn_s"):
            base = key[: -len("_bn_s")]
            state.setdefault(base + "_bn_rm", torch.zeros_like(value))
            state.setdefault(base + "_bn_riv", torch.full_like(value, 1.0 - 1e-5))
    return state


# ---------------------------------------------------------------------------------------------
# The report.


def _group(name: str) -> str:
    return ".".join(name.split(".")[:2])


def _compress(names: list[str]) -> list[str]:
    """``a.b.{bias, weight}`` lines, as Detectron2's checkpoint log groups keys."""
    groups: dict[str, list[str]] = {}
    for name in names:
        head, _, leaf = name.rpartition(".")
        groups.setdefault(head, []).append(leaf)
    lines = []
    for head, leaves in groups.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ", ".join(sorted(leaves)) + "}"
        lines.append(f"{head}.{leaf}" if head else leaf)
    return lines


@dataclass
class LoadReport:
    """What an initialisation did: detector keys loaded, source keys skipped (why), detector keys missing."""

    source: str
    format: str = "scratch"
    arch: str = ""
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    missing: list[str] = field(default_factory=list)  # detector keys left at their fresh init

    def table(self) -> str:
        into = f" -> {self.arch}" if self.arch else ""
        title = f"init weights: {self.source} ({FORMAT_NAMES.get(self.format, self.format)}){into}"
        if self.format == "scratch":
            return f"{title}: nothing loaded, all {len(self.missing)} detector tensors keep their fresh init"
        counts: dict[str, list[int]] = {}
        for col, names in enumerate((self.loaded, [n for n, _ in self.skipped], self.missing)):
            for name in names:
                counts.setdefault(_group(name), [0, 0, 0])[col] += 1
        width = max([len("module group")] + [len(g) for g in counts])
        lines = [title, f"{'module group':<{width}}  loaded  skipped  missing"]
        for group, (a, b, c) in counts.items():
            lines.append(f"{group:<{width}}  {a:>6}  {b:>7}  {c:>7}")
        lines.append(f"{'total':<{width}}  {len(self.loaded):>6}  {len(self.skipped):>7}  {len(self.missing):>7}")
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped:
            by_reason.setdefault(reason, []).append(name)
        if self.skipped:
            lines.append(f"skipped source tensors ({len(self.skipped)}):")
            for reason, names in by_reason.items():
                lines += [f"  {line}: {reason}" for line in _compress(names)]
        if self.missing:
            lines.append(f"missing, left at their fresh init ({len(self.missing)}):")
            lines += [f"  {line}" for line in _compress(self.missing)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "arch": self.arch,
            "loaded": list(self.loaded),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "missing": list(self.missing),
        }


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def transfer_state_dict(detector: nn.Module, state: dict, fmt: str, arch: str, source: str) -> LoadReport:
    """Copy every transferable source tensor whose common name and shape match a detector tensor."""
    target = unwrap_model(detector).state_dict()
    if fmt == "caffe2":
        state = _fill_folded_bn(state)
    by_canonical = {(to_detectron2(k, arch) or k): k for k in target}
    names, skipped = _canonical_source(state, fmt)
    new, loaded = {}, []
    for key, canonical in names.items():
        tkey = by_canonical.get(canonical)
        if key.endswith("num_batches_tracked") and tkey is None:
            continue  # FrozenBN targets have no counter
        reason = _not_transferred(canonical)
        if reason is None and tkey is None:
            reason = "no counterpart"
        if reason is None and state[key].shape != target[tkey].shape:
            reason = f"shape mismatch {_shape(state[key])} vs {_shape(target[tkey])}"
        if reason is not None:
            skipped.append((key, reason))
            continue
        new[tkey] = state[key]
        loaded.append(tkey)
    done = set(loaded)
    _check_backbone_matches(names, skipped, [c for c, t in by_canonical.items() if t not in done],
                            list(by_canonical), source)
    result = unwrap_model(detector).load_state_dict(new, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    done = set(loaded)
    missing = [k for k in target if k not in done and not k.endswith("num_batches_tracked")]
    return LoadReport(source=source, format=fmt, arch=arch, loaded=loaded, skipped=skipped, missing=missing)


BODY = ("backbone.bottom_up.", "backbone.body.")  # a backbone's trunk, in common (and torchvision) names
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")  # a GN or frozen target has none


def describe_backbone(canonical_names) -> str:
    """"ResNet-50 (bottleneck blocks 3-4-6-3)" from the trunk's common names, or what is known."""
    blocks: dict[int, int] = {}
    bottleneck = False
    for name in canonical_names:
        m = re.match(r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.", name)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
            bottleneck |= m.group(3) == "3"
    if not blocks:
        return "a non-ResNet trunk"
    counts = tuple(blocks[s] for s in sorted(blocks))
    depths = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
              (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
    depth = depths.get((*counts, bottleneck))
    kind = "bottleneck" if bottleneck else "basic"
    return f"{'ResNet-' + str(depth) if depth else 'a ResNet'} ({kind} blocks {'-'.join(map(str, counts))})"


def _check_backbone_matches(names: dict[str, str], skipped: list[tuple[str, str]], unloaded: list[str],
                            target: list[str], source: str) -> None:
    """A source trunk loads whole or not at all: ResNet-50 weights "load" 97 of a ResNet-18's 120
    tensors (bottleneck convs into basic-block convs) and a run from them would look pre-trained."""
    src_body = {k: c for k, c in names.items() if c.startswith(BODY) and not c.endswith(_RUNNING_STATS)}
    if not src_body:
        return  # the file has no trunk (a head-only file): nothing to compare
    wrong = [(k, r) for k, r in skipped if k in src_body and (r == "no counterpart" or r.startswith("shape mismatch"))]
    has_blocks = any(re.match(r"backbone\.(bottom_up\.res\d|body\.(layer\d|trunk_output))\.", c) for c in src_body.values())
    # a file of blocks must bring all of them (ResNet-18 weights into a ResNet-34 all fit, and
    # leave its extra blocks at random); a stem-only file is a partial init on purpose
    left = [c for c in unloaded if c.startswith(BODY) and not c.endswith(_RUNNING_STATS)] if has_blocks else []
    if not wrong and not left:
        return
    examples = "; ".join([f"{k}: {r}" for k, r in wrong[:2]] + [f"{c}: not in the file" for c in left[:2 - min(2, len(wrong))]])
    raise CheckpointError(
        f"{source}: its backbone does not match the detector's: the file holds "
        f"{describe_backbone(src_body.values())}, the detector is {describe_backbone(target)}; "
        f"{len(wrong)} of the file's {len(src_body)} trunk tensors do not fit and {len(left)} of the detector's are "
        f"not in the file (e.g. {examples}); set model.backbone to the file's")


# ---------------------------------------------------------------------------------------------
# How the source network computed: where its ResNet downsamples, and what input it expects.
#
# Detectron2's default (MSRA/Caffe2 ImageNet weights and the model zoo trained from them) puts
# the stride-2 of each bottleneck in its 1x1 conv and takes BGR pixels in 0..255 minus the mean;
# torchvision puts the stride in the 3x3 conv and takes RGB in 0..1, normalised with its
# mean/std. Loading one layout into the other succeeds and silently computes something else.

LAYOUT_CHOICES = {"auto": None, "true": True, "false": False}
INPUT_FORMATS = ("auto", "RGB", "BGR")
# torchvision's normalisation; Detectron2's BGR pixel mean is exactly 255 x this mean, reversed
TV_MEAN, TV_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class SourceLayout:
    stride_in_1x1: bool | None  # None: the file does not say
    input_format: str | None  # "RGB" (torchvision) / "BGR" (Caffe2 0..255) / None: not said
    why: str


def source_layout(fmt: str, meta: dict) -> SourceLayout:
    """What a weight file's format and top-level entries (``__author__``; predet's exports
    also record ``stride_in_1x1``) tell about its layout."""
    author = meta.get("__author__")
    if fmt == "caffe2":
        return SourceLayout(True, "BGR", "Caffe2/Detectron1 (MSRA) ResNet weights")
    if fmt == "detectron2":
        if author == "predet":  # torchvision layout unless the export says otherwise
            return SourceLayout(bool(meta.get("stride_in_1x1")), "RGB", "Detectron2 weights exported by predet")
        if author == "torchvision":
            return SourceLayout(False, "RGB", f"Detectron2 names written by {author} from torchvision weights")
        return SourceLayout(None, None, f"Detectron2 weights (author {author or 'not recorded'})")
    return SourceLayout(False, "RGB", FORMAT_NAMES.get(fmt, fmt))


def resolve_layout(layout: SourceLayout, stride_in_1x1: str = "auto", input_format: str = "auto") -> SourceLayout:
    """The file's layout with the user's answers (``init_stride_in_1x1``, ``init_input_format``)
    filling in, or overriding, what the file says."""
    choice = str(stride_in_1x1).lower()
    if choice not in LAYOUT_CHOICES:
        raise ConfigError(f"init_stride_in_1x1 must be auto, true or false, got {stride_in_1x1!r}")
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"init_input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    stride = layout.stride_in_1x1 if choice == "auto" else LAYOUT_CHOICES[choice]
    fmt = layout.input_format if input_format == "auto" else input_format
    return SourceLayout(stride, fmt, layout.why)


def init_layout(init: str, stride_in_1x1: str = "auto", input_format: str = "auto") -> SourceLayout:
    """The layout of the weights ``init`` names, to build the detector to match before loading."""
    if init in SCRATCH_INITS or not Path(init).is_file():
        return resolve_layout(SourceLayout(False, "RGB", "no weights"), stride_in_1x1, input_format)
    obj = read_weight_file(init)
    state, kind = flat_state_dict(obj, init)
    meta = obj if isinstance(obj, dict) else {}
    return resolve_layout(source_layout(detect_format(state, kind), meta), stride_in_1x1, input_format)


def bgr255_stem_to_rgb(weight: torch.Tensor) -> torch.Tensor:
    """A stem conv for BGR 0..255 minus Detectron2's mean -> the same conv for torchvision input.

    Detectron2 feeds ``255 * rgb[c] - 255 * mean[c]`` on the channels reversed; torchvision feeds
    ``(rgb[c] - mean[c]) / std[c]``. So the input channels flip and scale by ``255 * std[c]``;
    the means cancel exactly (Detectron2's BGR mean is 255 x torchvision's), no bias is needed.
    """
    scale = torch.tensor([255.0 * s for s in TV_STD], dtype=weight.dtype).view(1, 3, 1, 1)
    return weight.flip(1) * scale


def _check_layout(detector: nn.Module, layout: SourceLayout, path) -> None:
    """Refuse, with the reason, a load that would silently change what the network computes."""
    from predet.modeling.detectors import stride_in_1x1 as detector_stride

    mine = detector_stride(unwrap_model(detector))
    if mine is not None and layout.stride_in_1x1 is None:
        raise ConfigError(
            f"{path}: {layout.why} do not say where the ResNet downsamples. Detectron2's default "
            "(MSRA R-50/R-101 and the model zoo trained from them) is STRIDE_IN_1X1=True: set "
            "init_stride_in_1x1=true; weights converted from torchvision need init_stride_in_1x1=false")
    if mine is not None and layout.stride_in_1x1 != mine:
        where = "1x1" if layout.stride_in_1x1 else "3x3"
        raise ConfigError(
            f"{path}: the weights downsample in the {where} conv but the detector does not: build it with "
            f"model.stride_in_1x1={str(layout.stride_in_1x1).lower()} (predet finetune does this itself)")
    if layout.input_format is None:
        raise ConfigError(
            f"{path}: {layout.why} do not say which input they expect: set init_input_format=BGR for "
            "Detectron2's default (BGR pixels 0..255, MSRA weights) or init_input_format=RGB for "
            "weights converted from torchvision")


def load_init_weights(detector: nn.Module, init: str, arch: str, stride_in_1x1: str = "auto",
                      input_format: str = "auto") -> LoadReport:
    """Initialise ``detector`` (an ``arch`` detector) from ``init``; log and return the report.

    ``init`` is ``"scratch"``/``"random"`` (nothing loaded) or a weight file. Raises CheckpointError,
    naming the file, when a file contributes no tensor at all: a silent scratch run would look
    like a pre-training result. Detectron2/Caffe2 weights must match the detector's stride
    placement (``stride_in_1x1``: auto from the file, or true/false) and have their stem
    converted when they expect BGR 0..255 input (``input_format``: auto, RGB or BGR); a file
    that does not say is refused with what to set.
    """
    fpn_first_level(arch)  # validates arch
    if init in SCRATCH_INITS:
        keys = [k for k in unwrap_model(detector).state_dict() if not k.endswith("num_batches_tracked")]
        report = LoadReport(source=init, format="scratch", arch=arch, missing=keys)
        logger.info(report.table())
        return report
    path = Path(init)
    if not path.is_file():
        raise InputNotFound(
            f"init weights {init!r} not found; use 'scratch', 'random' or the path of a weight file"
        )
    obj = read_weight_file(path)
    state, kind = flat_state_dict(obj, path)
    fmt = detect_format(state, kind)
    if fmt == "unknown":
        sample = ", ".join(list(state)[:5]) or "no tensors"
        raise CheckpointError(
            f"{path}: unrecognised weight layout (first keys: {sample}); expected a PreDet checkpoint, "
            "a torchvision detector/ResNet/RegNet state dict or Detectron2 weights"
        )
    layout = resolve_layout(source_layout(fmt, obj if isinstance(obj, dict) else {}), stride_in_1x1, input_format)
    _check_layout(detector, layout, path)
    if layout.input_format == "BGR":
        stem = "conv1_w" if fmt == "caffe2" else next(
            (k for k in state if k.endswith(("stem.conv1.weight", "body.conv1.weight"))), None)
        if stem in state and state[stem].shape[1] == 3:
            state = {**state, stem: bgr255_stem_to_rgb(state[stem].float())}
            logger.info("%s: stem conv converted from BGR 0..255 input to torchvision's normalised RGB", path)
    report = transfer_state_dict(detector, state, fmt, arch, str(path))
    logger.info(report.table())
    if not report.loaded:
        reasons = "; ".join(f"{n}: {r}" for n, r in report.skipped[:5])
        raise CheckpointError(f"no weights from {path} matched the {arch} detector ({reasons})")
    return report
