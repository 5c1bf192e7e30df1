"""Backbone + FPN builders on torchvision, named so weights transfer to its detectors.

The returned module has ``body`` (a feature extractor returning C2..C5 as "0".."3"), ``fpn``
and ``out_channels``, exactly like torchvision's ``BackboneWithFPN``, so the keys
``backbone.body.*`` and ``backbone.fpn.*`` line up with ``maskrcnn_resnet50_fpn``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.regnet import BlockParams
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from predet.config.choices import BACKBONES, REGNETS, RESNETS


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 8, channels)


def norm_layer(name: str):
    """BN for pre-training, FrozenBN for classic fine-tuning, GN for from-scratch training."""
    layers = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d, "gn": group_norm}
    if name == "syncbn":  # converted by the trainer once the process group exists
        return nn.BatchNorm2d
    if name not in layers:
        raise ValueError(f"unknown norm {name!r}; choose one of {sorted(layers) + ['syncbn']}")
    return layers[name]


def _resnet_body(name: str, norm: str, stages) -> tuple[nn.Module, list[int]]:
    net = getattr(models, name)(weights=None, norm_layer=norm_layer(norm))
    body = IntermediateLayerGetter(net, return_layers={f"layer{s}": str(i) for i, s in enumerate(stages)})
    width = 512 if name in ("resnet18", "resnet34") else 2048
    return body, [width // 2 ** (4 - s) for s in stages]


def regnet_y_64gf(norm_layer=nn.BatchNorm2d) -> models.RegNet:
    """RegNetY-64GF, the "Regnet64" of SEER and of the paper; torchvision has no builder for it."""
    params = BlockParams.from_init_params(depth=20, w_0=352, w_a=147.48, w_m=2.4, group_width=328, se_ratio=0.25)
    return models.RegNet(params, norm_layer=norm_layer)


def _regnet_body(name: str, norm: str, stages) -> tuple[nn.Module, list[int]]:
    if name == "regnet_y_64gf":
        net = regnet_y_64gf(norm_layer(norm))
    else:
        net = getattr(models, name)(weights=None, norm_layer=norm_layer(norm))
    layers = {f"trunk_output.block{s}": str(i) for i, s in enumerate(stages)}
    body = create_feature_extractor(net, return_nodes=layers)
    with torch.no_grad():
        shapes = body(torch.zeros(1, 3, 64, 64))
    return body, [shapes[str(i)].shape[1] for i in range(len(stages))]


class BackboneFPN(nn.Module):
    """Feature body + FPN; attribute names match torchvision's ``BackboneWithFPN``."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int, fpn_norm=None, extra_blocks=None):
        super().__init__()
        self.body = body
        extra_blocks = LastLevelMaxPool() if extra_blocks is None else extra_blocks
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks, norm_layer=fpn_norm)
        self.out_channels = out_channels
        self.in_channels_list = in_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_backbone(
    name: str = "resnet50", norm: str = "bn", out_channels: int = 256, stages=(1, 2, 3, 4), extra_blocks=None
) -> BackboneFPN:
    """Backbone body + FPN with random weights.

    The default is the two-stage detectors' pyramid (C2..C5 -> P2..P5, P6 by max-pool);
    RetinaNet asks for ``stages=(2, 3, 4)`` and a P6/P7 block.
    """
    if name in RESNETS:
        body, in_channels = _resnet_body(name, norm, stages)
    elif name in REGNETS:
        body, in_channels = _regnet_body(name, norm, stages)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    fpn_norm = group_norm if norm == "gn" else None
    return BackboneFPN(body, in_channels, out_channels, fpn_norm=fpn_norm, extra_blocks=extra_blocks)
