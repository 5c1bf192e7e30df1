"""Pictures of predictions: boxes, labels and masks drawn on the image (``eval.visualize``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from predet.evaluation.inference import base_dataset, eval_mode

PRED_COLOR = "red"
TRUE_COLOR = "lime"


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image.cpu()
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def _label_text(label: int, category_names: Sequence[str]) -> str:
    return category_names[label - 1] if 1 <= label <= len(category_names) else str(label)


def _cpu(tensor):
    return None if tensor is None else tensor.detach().cpu()


def _draw(canvas, boxes, labels, masks, color, width):
    """Masks first, boxes over them, so the labels stay readable."""
    if len(boxes) == 0:
        return canvas
    if masks is not None and len(masks):
        canvas = draw_segmentation_masks(canvas, masks.bool(), alpha=0.4, colors=color)
    return draw_bounding_boxes(canvas, boxes.float(), labels=labels, colors=color, width=width)


def draw_detections(
    image: torch.Tensor, prediction: dict, target: dict | None, category_names: Sequence[str],
    score_threshold: float = 0.5,
) -> Image.Image:
    """The image with ground truth (lime, ``gt:`` labels) and the predictions scoring at least
    ``score_threshold`` (red, name and score) drawn over it, for eyeballing a detector."""
    canvas = _to_uint8(image)
    if target is not None:
        labels = [f"gt: {_label_text(int(l), category_names)}" for l in target["labels"]]
        canvas = _draw(canvas, target["boxes"].cpu(), labels, _cpu(target.get("masks")),
                       TRUE_COLOR, width=2)
    keep = prediction["scores"].detach().cpu() >= score_threshold
    boxes = prediction["boxes"].detach().cpu()[keep]
    labels = [f"{_label_text(int(l), category_names)} {float(s):.2f}"
              for l, s in zip(prediction["labels"].cpu()[keep], prediction["scores"].cpu()[keep])]
    masks = prediction.get("masks")
    if masks is not None:
        masks = masks.detach().cpu()[keep][:, 0] > 0.5
    canvas = _draw(canvas, boxes, labels, masks, PRED_COLOR, width=2)
    return to_pil_image(canvas)


@torch.no_grad()
def visualize(
    model, dataset, num_images: int, out_dir, device="cpu", score_threshold: float = 0.5,
) -> list[Path]:
    """Draw the first ``num_images`` images of ``dataset`` with predictions and ground truth
    into ``out_dir/vis_{image_id}.png``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = base_dataset(dataset).category_names
    model.to(device)
    paths = []
    with eval_mode(model):
        for index in range(min(num_images, len(dataset))):
            image, target = dataset[index]
            prediction = model([image.to(device)])[0]
            drawing = draw_detections(image, prediction, target, names, score_threshold)
            path = out_dir / f"vis_{int(target['image_id'])}.png"
            drawing.save(path)
            paths.append(path)
    return paths
