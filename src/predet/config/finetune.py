"""The fine-tuning config: the detector, the box-labelled data, the mask head's lr factor, the
solver (a named schedule or as given), the run and the evaluation (``predet finetune ...``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from predet.config.base import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Check,
    ConfigError,
    above,
    apply_overrides,
    between,
    checked,
    each,
    from_dict,
    load_yaml,
    one_of,
    validate,
)
from predet.config.choices import ARCHS, BACKBONES, NORMS
from predet.config.presets import preset_overrides
from predet.config.schedules import SCHEDULE_NAMES, normalize_schedule_name
from predet.config.train import SolverConfig, TrainConfig


@checked(arch=one_of(*ARCHS), backbone=one_of(*BACKBONES), norm=one_of(*NORMS), freeze_at=between(0, 5),
         fpn_channels=above(0), box_head_dim=above(0), mask_head_dim=above(0),
         anchor_sizes=each(POSITIVE, length=5, increasing=True), aspect_ratios=each(POSITIVE),
         min_size=above(0), max_size=above(0), rpn_batch_size_per_image=above(0),
         rpn_pre_nms_top_n_train=above(0), rpn_post_nms_top_n_train=above(0), rpn_pre_nms_top_n_test=above(0),
         rpn_post_nms_top_n_test=above(0), box_batch_size_per_image=above(0), detections_per_image=above(0),
         score_thresh=FRACTION)
@dataclass
class DetectorConfig:
    arch: str = "mask_rcnn"
    backbone: str = "resnet50"
    norm: str = "frozen_bn"  # frozen_bn | bn | syncbn | gn; from scratch needs syncbn or gn
    freeze_at: int = 2  # stages kept frozen: 0 none, 1 stem, 2 stem + res2 (Detectron2's default)
    stride_in_1x1: bool = False  # Detectron2/MSRA ResNets downsample in the 1x1 conv, torchvision in the 3x3
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_dim: int = 256
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: int = 800
    max_size: int = 1333
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    detections_per_image: int = 100
    score_thresh: float = 0.05


@checked(kind=one_of("coco", "lvis"), subset=NON_NEGATIVE, subset_seed=NON_NEGATIVE,
         repeat_factor_threshold=NON_NEGATIVE, flip_p=FRACTION)
@dataclass
class FinetuneDataConfig:
    train: str = ""  # COCO or LVIS json
    train_images: str = ""  # folder the json's file names are relative to
    val: str = ""
    val_images: str = ""
    test: str = ""  # evaluated once at the end, never used to choose settings
    test_images: str = ""
    kind: str = "coco"  # coco | lvis
    subset: int = 0  # fine-tune on N training images (0: all), written out as COCO json
    subset_seed: int = 0
    repeat_factor_threshold: float = 0.0  # > 0 turns on repeat-factor sampling (LVIS: 0.001)
    flip_p: float = 0.5


@checked(lr_mf=NON_NEGATIVE)
@dataclass
class OptimConfig:
    lr_mf: float = 1.0  # the mask head's lr is solver.lr x lr_mf (it is never pre-trained)


@checked(batch_size=above(0), num_workers=NON_NEGATIVE, visualize=NON_NEGATIVE)
@dataclass
class EvalConfig:
    batch_size: int = 2
    num_workers: int = 0  # loader workers of each rank's share of an evaluation
    visualize: int = 0  # PNGs of predictions written at the end


@checked(init_stride_in_1x1=Check(lambda v: v.lower() in ("auto", "true", "false"), "auto, true or false"),
         init_input_format=one_of("auto", "RGB", "BGR"),
         schedule=Check(lambda v: not v or normalize_schedule_name(v) in SCHEDULE_NAMES,
                        "empty or one of " + ", ".join(SCHEDULE_NAMES)), schedule_scale=POSITIVE)
@dataclass
class FinetuneConfig:
    init: str = "scratch"  # scratch | a PreDet checkpoint | an external backbone file
    init_stride_in_1x1: str = "auto"  # Detectron2 weights: auto (from the file) | true (D2 default) | false
    init_input_format: str = "auto"  # Detectron2 weights: auto | BGR (D2 default, 0..255) | RGB (torchvision)
    preset: str = ""  # e.g. coco/mask_rcnn/predet_ig50m (supplement Table 1)
    schedule: str = "1x"  # 1x 2x 3x 6x 9x 60k 70k 130k at batch 16, scaled to the real batch; empty: solver as given
    schedule_scale: float = 1.0
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: DetectorConfig = field(default_factory=DetectorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_finetune_config(path=None, overrides=()) -> FinetuneConfig:
    """YAML, then the preset it names (or an override names), then the overrides."""
    base = load_yaml(path) if path else {}
    preset = apply_overrides(base, list(overrides)).get("preset", "")
    if preset:
        try:
            base = apply_overrides(base, [f"{k}={v}" for k, v in preset_overrides(preset).items()])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        cfg = from_dict(FinetuneConfig, apply_overrides(base, list(overrides)))
        validate(cfg)
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
