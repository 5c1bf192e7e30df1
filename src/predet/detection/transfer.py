"""Initialising a detector from pre-trained weights (method.md §2 "Transfer").

``load_init_weights`` accepts a PreDet pre-training checkpoint, a torchvision detector or
classification backbone file (also with ``module.``/``encoder.``-style prefixes, as SEER, InfoMin
and MoCo releases ship them), a ``.safetensors`` file, and Detectron2 weights (``.pth`` or the
model-zoo ``.pkl``, including Caffe2-named ResNet ImageNet weights).

Every source is first renamed into one common namespace, Detectron2's names, through the single
torchvision <-> Detectron2 table below (``RENAMES``); the export to Detectron2 uses the same table.
Detectron2 names carry absolute pyramid levels (``fpn_lateral3`` is C3), so the shift between a
two-stage FPN over C2..C5 and RetinaNet's FPN over C3..C5 falls out of the renaming.

What transfers is what PreDet pre-trains: backbone body, FPN, RPN 3x3 trunk and the box head FCs.
Everything else (class predictors, mask head, RPN/RetinaNet output layers, PreDet's pretext heads)
starts fresh, whatever the source holds, so that all initialisations compare fairly.

Nothing here unpickles freely: ``.pth`` goes through ``torch.load(weights_only=True)`` and
``.pkl`` through :class:`RestrictedUnpickler`, which only rebuilds NumPy arrays and dicts.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from predet.config import SCRATCH_INITS, ConfigError
from predet.detection.models import ARCHS
from predet.engine.checkpoint import RefusedCheckpoint, load_checkpoint
from predet.engine.distributed import unwrap_model
from predet.errors import CheckpointError, InputNotFound

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The one torchvision <-> Detectron2 name table (import and export both use it).
#
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


# ---------------------------------------------------------------------------------------------
# Reading weight files without running code.

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    # protocol-5 pickles of arrays rebuild them from an in-band buffer
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    # Python 3 protocol-2 pickles store array bytes as latin-1 text: encode(str, "latin1") -> bytes
    ("_codecs", "encode"),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The only ``_codecs.encode`` a weight pickle needs; other codecs are refused."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, dtypes and scalars, (ordered) dicts and plain containers only.

    A Detectron2 model-zoo ``.pkl`` needs no more; any other global (``os.system``, ``eval``,
    a class with a ``__reduce__`` payload) raises ``pickle.UnpicklingError`` before it is
    imported, so nothing in the file runs.
    """

    def __init__(self, file, path: str | Path = "<pickle>"):
        super().__init__(file, encoding="latin1")  # Python 2 era Caffe2/Detectron files
        self.path = str(path)

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) not in _NUMPY_GLOBALS:
            raise RefusedCheckpoint(
                f"refusing to load {self.path}: it references the global {module}.{name}; only NumPy "
                "arrays and dicts are allowed in a weight file (nothing in it was executed)"
            )
        if module == "_codecs":
            return _latin1_encode
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core." + module[len("numpy.core."):]  # NumPy 2 name, no deprecation warning
        return getattr(importlib.import_module(module), name)


def load_pickle_weights(path: str | Path):
    """Load a ``.pkl`` weight file through :class:`RestrictedUnpickler`."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, path).load()


def read_weight_file(path: str | Path):
    """The raw object in a weight file, read by a loader that cannot run code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike: unusable
            raise CheckpointError(f"cannot read {path}: truncated or damaged safetensors file ({exc})") from None
    if path.suffix in (".pkl", ".pickle") and not zipfile.is_zipfile(path):
        return load_pickle_weights(path)
    return load_checkpoint(path, map_location="cpu")


def _as_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.array(value, copy=True))
    return None


def _flat_state_dict(obj, path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors by name, checkpoint kind) from the usual wrappers: model / state_dict / blobs."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    kind = None
    extra = obj.get("extra_state")
    if isinstance(extra, dict):
        kind = extra.get("kind")
    for key in ("model", "state_dict", "blobs"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {}
    for name, value in obj.items():
        tensor = _as_tensor(value)
        if isinstance(name, str) and tensor is not None:
            state[name] = tensor
    return state, kind


# Component names that wrap a ResNet/RegNet in self-supervised and DDP releases.
_WRAPPERS = {"module", "encoder", "encoder_q", "base_encoder", "model", "backbone", "trunk"}
_BACKBONE_ROOTS = ("conv1.weight", "stem.0.weight")


def _backbone_prefix(keys) -> str | None:
    """The wrapper prefix in front of a classification backbone (``module.encoder_q.``), or None."""
    found = []
    for key in keys:
        for root in _BACKBONE_ROOTS:
            if key.endswith(root):
                prefix = key[: -len(root)]
                if all(part in _WRAPPERS for part in prefix.split(".")[:-1]):
                    found.append(prefix)
    return min(found, key=len) if found else None


def _detect_format(state: dict, kind: str | None) -> str:
    keys = list(state)
    if kind == "predet_pretrain" or any(k.startswith("crpn.trunk.") for k in keys):
        return "predet"
    if any(k.startswith(("backbone.bottom_up.", "proposal_generator.")) for k in keys):
        return "detectron2"
    if any(c2_to_detectron2(k) for k in keys) and not any("." in k for k in keys):
        return "caffe2"
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision_detector"
    if _backbone_prefix(keys) is not None:
        return "backbone"
    return "unknown"


FORMAT_NAMES = {
    "predet": "PreDet pre-training checkpoint",
    "detectron2": "Detectron2 weights",
    "caffe2": "Caffe2/Detectron1 ResNet weights",
    "torchvision_detector": "torchvision detector weights",
    "backbone": "classification backbone",
    "scratch": "no weights (from scratch)",
}

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
    prefix = _backbone_prefix(state) if fmt == "backbone" else None
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
    state, kind = _flat_state_dict(obj, init)
    meta = obj if isinstance(obj, dict) else {}
    return resolve_layout(source_layout(_detect_format(state, kind), meta), stride_in_1x1, input_format)


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
    from predet.detection.models import stride_in_1x1 as detector_stride

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

    ``init`` is ``"scratch"``/``"random"`` (nothing loaded) or a weight file. Raises ValueError,
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
    state, kind = _flat_state_dict(obj, path)
    fmt = _detect_format(state, kind)
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
