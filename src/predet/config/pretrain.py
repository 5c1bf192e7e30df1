"""The pre-training config: the two-view sampler, the weak data, the PreDet model and its
losses, the solver and the run (``predet pretrain --config ... key=value``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from predet.config.base import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    RANGE,
    Check,
    above,
    at_least,
    between,
    checked,
    each,
    load_config,
    one_of,
)
from predet.config.choices import BACKBONES, NORMS
from predet.config.train import SolverConfig, TrainConfig


@checked(size=at_least(32), scale=Check(lambda v: RANGE.ok(v) and v[1] <= 1, "2 values in (0, 1], ascending"),
         ratio=RANGE, min_overlap=FRACTION, num_queries=above(0), query_aspect=RANGE, query_scale=RANGE,
         min_query_px=POSITIVE, flip_p=FRACTION, jitter=NON_NEGATIVE, hue=between(0, 0.5), grayscale_p=FRACTION,
         max_tries=above(0))
@dataclass
class ViewConfig:
    """Knobs of the two-view sampler (defaults follow method.md §2)."""

    size: int = 160
    scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    min_overlap: float = 0.3  # shared area / smaller crop area
    num_queries: int = 16
    query_aspect: list[float] = field(default_factory=lambda: [1 / 3, 3.0])
    query_scale: list[float] = field(default_factory=lambda: [0.1, 0.8])  # query side / sqrt(shared area), log-uniform
    min_query_px: float = 8.0  # smallest query side in view pixels
    flip_p: float = 0.5
    jitter: float = 0.4  # brightness/contrast/saturation strength; 0 disables jitter
    hue: float = 0.1  # up to 0.5 (a full turn of the colour wheel)
    grayscale_p: float = 0.0  # per view; colour alone can then no longer match a query
    max_tries: int = 20


@checked(backbone=one_of(*BACKBONES), norm=one_of(*NORMS), fpn_channels=above(0), box_head_dim=above(0),
         anchor_sizes=each(POSITIVE, length=5, increasing=True), aspect_ratios=each(POSITIVE), crpn_hidden=above(0),
         crpn_fg_iou=FRACTION, crpn_bg_iou=FRACTION, crpn_anchors_per_query=above(0), crpn_pos_fraction=FRACTION,
         crpn_init_std=NON_NEGATIVE, crpn_p2_small_anchor=NON_NEGATIVE, pre_nms_top_n=above(0), nms_thresh=FRACTION, post_nms_top_n=above(0),
         rois_per_query=above(0), roi_canonical_scale=above(0), roi_pos_fraction=FRACTION, roi_pos_iou=FRACTION,
         proj_dim=above(0), temperature=POSITIVE, head_dtype=one_of("float32", "bfloat16"))
@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    norm: str = "bn"  # "bn" or "syncbn" for pre-training
    fpn_channels: int = 256
    box_head_dim: int = 1024
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    crpn_hidden: int = 256
    crpn_fg_iou: float = 0.7
    crpn_bg_iou: float = 0.3
    crpn_anchors_per_query: int = 256
    crpn_pos_fraction: float = 0.5
    crpn_init_std: float = 0.001  # std of the weight generators' last layers
    crpn_iou_aware: bool = False  # positive anchors' score target: their regressed box's IoU, not 1
    # a second, smaller anchor size on P2 only (0: none): small queries an anchor of anchor_sizes[0]
    # cannot reach at IoU 0.5
    crpn_p2_small_anchor: int = 0
    pre_nms_top_n: int = 64  # per query
    nms_thresh: float = 0.7
    post_nms_top_n: int = 16  # per query
    rois_per_query: int = 16
    # Box side that RoIAlign maps to P4 (torchvision and Detectron2: 224 for 800 px images).
    # Scale it with the image size, or small images send every RoI to P2/P3.
    roi_canonical_scale: int = 224
    roi_pos_fraction: float = 0.5
    roi_pos_iou: float = 0.5
    proj_dim: int = 128
    temperature: float = 0.2
    # Run the backbone on each view separately, so batch norm's statistics are per view: one
    # shared BN batch lets the contrastive task match views through batch statistics.
    per_view_bn: bool = False
    # "bfloat16": the pretext heads' layers (box head FCs, CRPN trunk and weight generators,
    # contrastive projection) multiply in bf16 when the run is float32 (no autocast), with
    # float32 parameters, accumulation and outputs, as GPU autocast runs them; the geometry
    # (dynamic 1x1 conv, deltas, IoU, similarities) stays float32. On a CPU with AVX512-BF16 or
    # AMX those products are 4-6x faster, and they are most of what the pretext heads add to a
    # CPU step (README "Benchmarks"). A recipe change, measured to learn the same held-out
    # signals (benchmarks/results/fashiondet/README.md); on a CPU without bf16 units it is slower.
    head_dtype: str = "float32"


@checked(lambda_cls=NON_NEGATIVE, lambda_rpn=NON_NEGATIVE, lambda_roi=NON_NEGATIVE, cls_loss=one_of("softmax", "bce"))
@dataclass
class LossConfig:
    lambda_cls: float = 1.0
    lambda_rpn: float = 1.0
    lambda_roi: float = 1.0
    cls_loss: str = "softmax"  # "softmax" (normalised multi-hot) or "bce"
    cls_head_norm: bool = False  # BN (no affine) on the pooled features before the linear layer


@checked(val_pairs=above(0), val_max_images=above(0))
@dataclass
class DataConfig:
    train: str = ""  # labels.jsonl, a .tar shard pattern, or a folder of shards
    val: str = ""  # optional held-out labels.jsonl or shards (true tags) for the pretext diagnostics
    val_pairs: int = 32  # held-out two-view pairs of the CRPN recall and contrastive top-1
    val_max_images: int = 256  # held-out whole images of the weak-label mAP (the first N of data.val)
    vocab: str = ""  # optional vocab.json (a list of names); built from the data if empty
    views: ViewConfig = field(default_factory=ViewConfig)


@checked(iters=above(0), subset=NON_NEGATIVE, val_subset=NON_NEGATIVE, period=above(0), seed=NON_NEGATIVE,
         threads=NON_NEGATIVE, device=Check(lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
                                            "auto, cpu, cuda or cuda:N"))
@dataclass
class ProbeConfig:
    """A short fine-tuning of the current weights, every ``period`` iterations, on a fixed small
    box-labelled set: is the pre-training helping yet? (``predet.evaluation.probe``)"""

    data: str = ""  # COCO json of the probe's training images; empty: no probe
    images: str = ""  # the folder its file names are relative to
    val: str = ""  # COCO json of the fixed val split it is scored on
    val_images: str = ""
    config: str = "finetune/fashiondet_r18_cpu"  # the fine-tuning config a probe runs
    overrides: list[str] = field(default_factory=list)  # more key=value for it
    iters: int = 100  # its fine-tuning iterations; its 1x schedule's decays are placed inside them
    # train only the FPN and heads (model.freeze_at=5): the backbone's features as pre-training
    # left them, at about half a step's cost (on FashionDet: 3.7 val box AP against 1.2 from
    # random weights after 100 iterations, where the whole network fine-tuned gave 2.2 and 1.3)
    freeze_backbone: bool = True
    subset: int = 200  # its training images (0: all of data)
    val_subset: int = 100  # at most this many val images score it, a fixed random subset (0: all of val)
    period: int = 400  # pre-training iterations between probes (and one at the end)
    seed: int = 0
    threads: int = 1  # CPU threads of a probe's process (0: as many as it likes)
    device: str = "cpu"  # where a probe runs: beside a GPU run, the CPU takes no GPU memory from it
    background: bool = True  # beside the pre-training; false: the run waits for each probe


@checked(reference_batch=NON_NEGATIVE)
@dataclass
class PretrainConfig:
    # Images per step (all processes together) at which solver.lr, max_iters, warmup_iters and
    # milestones are given; the run scales them linearly to its real total batch
    # (train.batch_size x processes). 0: use them as given.
    reference_batch: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def load_pretrain_config(path=None, overrides=()) -> PretrainConfig:
    return load_config(PretrainConfig, path, overrides)
