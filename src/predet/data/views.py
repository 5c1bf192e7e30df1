"""Two views of one image and the query boxes they share (method.md §2.1–2.2).

Every view keeps its geometric transform (crop in source pixels, scale, flip), so a box in
source coordinates maps exactly into either view. Randomness comes from a per-sample seed,
which makes a sample reproducible whatever worker or process draws it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from predet.config.pretrain import ViewConfig
from predet.data.weak import collate_weak


@dataclass(frozen=True)
class ViewTransform:
    """Source -> view mapping: crop ``(x0, y0, w, h)`` resized to ``size`` and maybe flipped."""

    x0: float
    y0: float
    w: float
    h: float
    size: int
    flip: bool

    def map_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Source-pixel xyxy boxes -> view-pixel xyxy boxes."""
        sx, sy = self.size / self.w, self.size / self.h
        x1 = (boxes[:, 0] - self.x0) * sx
        x2 = (boxes[:, 2] - self.x0) * sx
        y1 = (boxes[:, 1] - self.y0) * sy
        y2 = (boxes[:, 3] - self.y0) * sy
        if self.flip:
            x1, x2 = self.size - x2, self.size - x1
        return torch.stack([x1, y1, x2, y2], dim=1)

    def unmap_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """View-pixel xyxy boxes -> source-pixel xyxy boxes (inverse of ``map_boxes``)."""
        x1, y1, x2, y2 = boxes.unbind(1)
        if self.flip:
            x1, x2 = self.size - x2, self.size - x1
        sx, sy = self.w / self.size, self.h / self.size
        return torch.stack([x1 * sx + self.x0, y1 * sy + self.y0, x2 * sx + self.x0, y2 * sy + self.y0], 1)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.x0, self.y0, self.w, self.h, float(self.size), float(self.flip)])


def _log_uniform(rng: np.random.Generator, low: float, high: float, n: int | None = None):
    return np.exp(rng.uniform(math.log(low), math.log(high), size=n))


def sample_crop(rng: np.random.Generator, width: int, height: int, cfg: ViewConfig):
    """A RandomResizedCrop-style crop ``(x0, y0, w, h)`` in source pixels."""
    area = width * height
    for _ in range(cfg.max_tries):
        target = area * rng.uniform(*cfg.scale)
        aspect = _log_uniform(rng, *cfg.ratio)
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if w <= width and h <= height:
            return rng.uniform(0, width - w), rng.uniform(0, height - h), w, h
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, float(side), float(side)


def _intersection(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return x1, y1, x2, y2


def sample_crop_pair(rng: np.random.Generator, width: int, height: int, cfg: ViewConfig):
    """Two crops whose shared region covers at least ``min_overlap`` of the smaller one."""
    first = sample_crop(rng, width, height, cfg)
    for _ in range(cfg.max_tries):
        second = sample_crop(rng, width, height, cfg)
        x1, y1, x2, y2 = _intersection(first, second)
        if x2 <= x1 or y2 <= y1:
            continue
        shared = (x2 - x1) * (y2 - y1)
        smaller = min(first[2] * first[3], second[2] * second[3])
        if shared >= cfg.min_overlap * smaller:
            return first, second
    return first, first


def sample_queries(rng: np.random.Generator, region, num: int, cfg: ViewConfig, min_side: float):
    """Q boxes (source xyxy) inside ``region``, log-uniform in size and aspect ratio."""
    x1, y1, x2, y2 = region
    rw, rh = x2 - x1, y2 - y1
    base = math.sqrt(rw * rh)
    low = min(max(cfg.query_scale[0] * base, min_side), min(rw, rh))
    high = max(cfg.query_scale[1] * base, low)
    side = _log_uniform(rng, low, high, num)
    aspect = _log_uniform(rng, *cfg.query_aspect, num)
    w = np.minimum(side * np.sqrt(aspect), rw)
    h = np.minimum(side / np.sqrt(aspect), rh)
    qx = x1 + rng.uniform(0, 1, num) * (rw - w)
    qy = y1 + rng.uniform(0, 1, num) * (rh - h)
    return torch.tensor(np.stack([qx, qy, qx + w, qy + h], 1), dtype=torch.float32)


def render_view(image: Image.Image, t: ViewTransform) -> torch.Tensor:
    """Crop + resize + flip as one resampling; uint8 CHW (a quarter of float32's bytes to send
    from a loader worker: float views at 800 px fill a container's shared memory)."""
    view = image.resize((t.size, t.size), Image.BILINEAR, box=(t.x0, t.y0, t.x0 + t.w, t.y0 + t.h))
    if t.flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return TF.pil_to_tensor(view)


# A view's colour change as 9 numbers: brightness, contrast, saturation and hue factors, a
# grayscale flag, and the order the four adjustments run in (-1: not run).
COLOUR_PARAMS = 9
_IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0)


def sample_colour(rng: np.random.Generator, cfg: ViewConfig) -> torch.Tensor:
    """A view's random colour change (brightness/contrast/saturation/hue jitter in a random order,
    then maybe grayscale), drawn from ``rng``, as :data:`COLOUR_PARAMS` numbers.

    Only drawn here: :func:`apply_colour` applies it where the model runs (the GPU), because at
    800 px the jitter, the hue's round trip through HSV above all, is most of a loader core's time."""
    params = list(_IDENTITY)
    if cfg.jitter > 0 or cfg.hue > 0:
        ops = 4 if cfg.hue > 0 else 3
        order = rng.permutation(ops)
        for i in order:
            params[i] = rng.uniform(-cfg.hue, cfg.hue) if i == 3 else rng.uniform(1 - cfg.jitter, 1 + cfg.jitter)
        params[5:5 + ops] = [float(i) for i in order]
    if cfg.grayscale_p > 0 and rng.uniform() < cfg.grayscale_p:
        params[4] = 1.0
    return torch.tensor(params, dtype=torch.float32)


_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def apply_colour(img: torch.Tensor, params) -> torch.Tensor:
    """One [0, 1] float view with its colour change (:func:`sample_colour`) applied."""
    params = params.tolist() if isinstance(params, torch.Tensor) else list(params)
    jittered = False
    for i in params[5:]:
        if i >= 0:
            img = _ADJUST[int(i)](img, params[int(i)])
            jittered = True
    if jittered:
        img = img.clamp(0, 1)
    if params[4]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return img


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) images -> (N, 3, H, W), copied in their pixel-interleaved layout (``pil_to_tensor``
    returns a permuted view): a plain memcpy, where ``torch.stack`` of the CHW views is a strided
    copy ~30x slower, a seventh of a loader core at 800 px. :func:`as_float_images` makes the
    result channel-planar again, on the device."""
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any memory layout) -> contiguous [0, 1] float32; floats pass through."""
    if images.dtype != torch.uint8:
        return images
    return images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def colour_views(views: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
    """A batch of uint8 views (N, 3, H, W) as [0, 1] floats with each one's colour change, on the
    views' device (the loader sends uint8 crops and the changes' parameters)."""
    images = as_float_images(views)
    if params is None:
        return images
    rows = params.tolist()
    if all(row == list(_IDENTITY) for row in rows):
        return images
    return torch.stack([apply_colour(image, row) for image, row in zip(images, rows)])


def make_two_views(image: Image.Image, seed: int, cfg: ViewConfig) -> dict:
    """Views (uint8 CHW) and their colour changes (applied by :func:`colour_views` where the
    model runs), queries ``b1``/``b2`` (Q, 4 xyxy in each view) and both transforms."""
    rng = np.random.default_rng(seed)
    image = image.convert("RGB")
    width, height = image.size
    crop1, crop2 = sample_crop_pair(rng, width, height, cfg)
    t1 = ViewTransform(*crop1, size=cfg.size, flip=bool(rng.uniform() < cfg.flip_p))
    t2 = ViewTransform(*crop2, size=cfg.size, flip=bool(rng.uniform() < cfg.flip_p))
    # The smallest query must stay min_query_px wide in the view that magnifies least.
    min_side = cfg.min_query_px * max(t1.w, t1.h, t2.w, t2.h) / cfg.size
    queries = sample_queries(rng, _intersection(crop1, crop2), cfg.num_queries, cfg, min_side)
    colour1, colour2 = sample_colour(rng, cfg), sample_colour(rng, cfg)
    return {
        "view1": render_view(image, t1),
        "view2": render_view(image, t2),
        "colour1": colour1,
        "colour2": colour2,
        "b1": t1.map_boxes(queries),
        "b2": t2.map_boxes(queries),
        "queries_src": queries,
        "transform1": t1.as_tensor(),
        "transform2": t2.as_tensor(),
        "seed": seed,  # what the loader draws from for this sample's CRPN anchor sample (CPU runs)
    }


class TwoViewTransform:
    """Picklable callable ``(image, seed) -> views`` for the weak-label datasets."""

    def __init__(self, cfg: ViewConfig):
        self.cfg = cfg

    def __call__(self, image: Image.Image, seed: int) -> dict:
        return make_two_views(image, seed, self.cfg)


def decorrelated_colours(cfg: ViewConfig) -> ViewConfig:
    """The same views with independent strong colour changes per view (any hue, some grey),
    as BYOL/SoCo augment: the held-out contrastive check then cannot be passed by colour."""
    return dataclasses.replace(cfg, jitter=max(cfg.jitter, 0.4), hue=0.5, grayscale_p=max(cfg.grayscale_p, 0.2))


class WholeImageTransform:
    """Picklable ``(image, seed) -> {"image"}``: the whole image resized to ``size`` (no
    augmentation, uint8), what the held-out weak-label mAP is measured on."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, seed: int) -> dict:
        image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return {"image": TF.pil_to_tensor(image)}


def collate_two_view(samples: list[dict], colour_in_loader: bool = False,
                     crpn_sampler=None) -> dict:
    """Stack the two-view samples that decoded; skipped images travel along for counting.

    ``colour_in_loader``: apply the views' colour changes here, in the loader worker, and send
    float views. ``crpn_sampler``: draw the CRPN's anchor sample here too (``crpn_pos``,
    ``crpn_neg``). For CPU training: the workers share the step's cores but run beside it, so
    this work (5 % and 2 % of a CPU recipe step in the main process) is hidden there; on a GPU
    it belongs on the device (uint8 views, :func:`predet.data.views.colour_views` in the model)."""
    batch = collate_weak(samples)
    kept = batch["samples"]
    out = {"skipped": batch["skipped"], "damaged_shards": batch["damaged_shards"], "num_images": len(kept),
           "labels": batch["labels"]}
    if kept:
        for key in ("view1", "view2"):
            out[key] = stack_images([s[key] for s in kept])
        for key in ("colour1", "colour2", "b1", "b2", "transform1", "transform2"):
            out[key] = torch.stack([s[key] for s in kept])
        if colour_in_loader:
            for view, colour in (("view1", "colour1"), ("view2", "colour2")):
                out[view] = colour_views(out[view], out.pop(colour))
        if crpn_sampler is not None:
            out["crpn_pos"], out["crpn_neg"] = crpn_sampler(out["b2"], [s["seed"] for s in kept])
    return out


def collate_images(samples: list[dict]) -> dict:
    """Whole images with their tags (the weak-label mAP's batches)."""
    batch = collate_weak(samples)
    kept = batch["samples"]
    out = {"skipped": batch["skipped"], "num_images": len(kept), "labels": batch["labels"]}
    if kept:
        out["image"] = stack_images([s["image"] for s in kept])
    return out
