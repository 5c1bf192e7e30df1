"""Small builders shared by the tests: tiny models, smooth images, two-view batches."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from predet.models.predet import LossConfig, ModelConfig, PreDet
from predet.views import ViewConfig, make_two_views


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", fpn_channels=32, box_head_dim=64, crpn_hidden=32,
                anchor_sizes=[8, 16, 32, 64, 128], crpn_anchors_per_query=64, pre_nms_top_n=32,
                post_nms_top_n=8, rois_per_query=8, proj_dim=32)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(num_classes=5, loss: LossConfig | None = None, **kw) -> PreDet:
    return PreDet(num_classes, tiny_model_config(**kw), loss or LossConfig())


def smooth_image(seed: int, width=200, height=150) -> Image.Image:
    """A low-frequency RGB image: resampling it twice gives nearly the same pixels."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.uniform(0, 255, (6, 8, 3))).astype(np.uint8))
    return small.resize((width, height), Image.BICUBIC)


def two_view_batch(n=2, size=64, q=4, seed=0, num_classes=5) -> dict:
    cfg = ViewConfig(size=size, num_queries=q, min_query_px=6)
    samples = [make_two_views(smooth_image(seed + i), seed + i, cfg) for i in range(n)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("view1", "view2", "b1", "b2")}
    labels = torch.zeros(n, num_classes)
    labels[torch.arange(n), torch.arange(n) % num_classes] = 1
    batch["labels"] = labels
    batch["num_images"] = n
    return batch
