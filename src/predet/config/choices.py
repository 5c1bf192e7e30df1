"""The names a config may choose from: backbones, norms, detector architectures, and the
``init=`` values that load no weights. Torch-free, so the sweep and the checks can read them."""

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d")

REGNETS = ("regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
           "regnet_y_16gf", "regnet_y_32gf", "regnet_y_64gf", "regnet_x_400mf", "regnet_x_3_2gf", "regnet_x_8gf")

BACKBONES = RESNETS + REGNETS

NORMS = ("bn", "syncbn", "frozen_bn", "gn")

ARCHS = ("mask_rcnn", "faster_rcnn", "retinanet")

# Keys that say how a run is executed, not what it trains: they may change when a run is
# resumed, and runs that differ only in them are the same setting.
SCRATCH_INITS = ("scratch", "random")  # init= values that load no weights (torch-free home: sweep reads it)
