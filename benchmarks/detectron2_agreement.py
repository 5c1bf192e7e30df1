"""Do predet's Detectron2 exports find what predet finds? (the README's "Moving to Detectron2" check)

Two steps, in two environments:

    # 1. with predet: export the checkpoint, build the image folder, predict with predet
    .venv/bin/python benchmarks/detectron2_agreement.py prepare --checkpoint RUN/checkpoints/model_final.pth \\
        --images data/fashiondet/det/images/test --out /tmp/agree/ARCH
    # 2. where Detectron2 is installed: run its DefaultPredictor on the same images and match
    D2/bin/python benchmarks/detectron2_agreement.py compare --out /tmp/agree/ARCH [--readme README.md]

The image folder holds square images at the test size and non-square ones that need no resize
(a short side at the test size, the long side under the max size), so the comparison isolates
the model from the two frameworks' resizing (torchvision resizes the normalised float image,
Detectron2 the 8-bit one). ``compare`` registers the README's Detectron2 code (its block
between the ``predet: detectron2 registrations`` markers, so what is checked is what users copy)
and runs three set-ups: the README's earlier advice (an RGB array, Detectron2's default anchors),
BGR with the default anchors, and BGR with the README's ``TorchvisionAnchorGenerator`` (the
fragment's default). A predet detection agrees when a Detectron2 detection of the same class has
box IoU > 0.9 and a score within 1e-3. Prints one JSON object (the committed
``benchmarks/results/detectron2_agreement.json`` holds the arches' objects).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

MARK = "# predet: detectron2 registrations"
IOU_MIN, SCORE_TOL = 0.9, 1e-3


# --------------------------------------------------------------------------- step 1 (predet)

def build_images(source: Path, out: Path, square: int, wide: int) -> list[Path]:
    """Six square test images and four non-square ones (two side by side, cropped to ``wide``),
    landscape and portrait, none needing a resize at a test size of ``square``."""
    from PIL import Image

    files = sorted(p for p in source.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:14]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(files[:6]):
        Image.open(path).convert("RGB").resize((square, square)).save(out / f"square{i}.png")
        written.append(out / f"square{i}.png")
    for i in range(4):
        a, b = (Image.open(p).convert("RGB").resize((square, square)) for p in files[6 + 2 * i: 8 + 2 * i])
        canvas = Image.new("RGB", (2 * square, square))
        canvas.paste(a, (0, 0))
        canvas.paste(b, (square, 0))
        canvas = canvas.crop((0, 0, wide, square))
        if i % 2:
            canvas = canvas.transpose(Image.Transpose.ROTATE_90)
        canvas.save(out / f"nonsquare{i}.png")
        written.append(out / f"nonsquare{i}.png")
    return written


def prepare(checkpoint: Path, images: Path, out: Path) -> None:
    from predet.checkpoint.export import export_checkpoint
    from predet.evaluation.predict import predict
    from predet.modeling.detectors import load_detector

    detector, _, _ = load_detector(checkpoint)
    square, largest = int(detector.transform.min_size[-1]), int(detector.transform.max_size)
    wide = min(largest, 2 * square) // 32 * 32
    if wide <= square:
        raise SystemExit(f"{checkpoint}: model.max_size {largest} leaves no non-square size without a resize; "
                         "fine-tune with a larger model.max_size for this check")
    build_images(images, out / "images", square, wide)
    export_checkpoint(checkpoint, out / "export", formats=("detectron2",))
    predict(checkpoint, out / "images", out / "predet", batch_size=1, num_workers=0, progress=False)
    print(f"prepared {out}: images {square} px square and {square}x{wide}; export and predet's detections")


# --------------------------------------------------------------------------- step 2 (Detectron2)

def readme_registrations(readme: Path) -> str:
    """The README's Python block that registers the fragment's names in Detectron2."""
    for block in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S):
        if block.startswith(MARK):
            return block
    raise SystemExit(f"{readme}: no ```python block starting with {MARK!r}")


def box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(predet: list[dict], d2: list[dict]) -> list[tuple[dict, dict | None, float]]:
    """Each predet detection (highest score first) with the unused Detectron2 detection of its
    class that overlaps it most."""
    used, pairs = set(), []
    for p in sorted(predet, key=lambda r: -r["score"]):
        best, best_iou = None, 0.0
        for j, q in enumerate(d2):
            if j not in used and q["category_id"] == p["category_id"]:
                iou = box_iou(p["box"], q["box"])
                if iou > best_iou:
                    best, best_iou = j, iou
        if best is not None and best_iou > 0:
            used.add(best)
        pairs.append((p, d2[best] if best is not None and best_iou > 0 else None, best_iou))
    return pairs


def mask_iou(a, b) -> float:
    inter, union = (a & b).sum(), (a | b).sum()
    return float(inter) / float(union) if union else 1.0


def compare(out: Path, readme: Path) -> dict:
    import cv2
    import numpy as np
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    from pycocotools import mask as mask_utils

    exec(compile(readme_registrations(readme), str(readme), "exec"), {})  # noqa: S102 - our own README's code
    info = json.loads((out / "predet" / "image_info.json").read_text())
    cat_ids = [c["id"] for c in info["categories"]]
    by_image: dict[int, list[dict]] = {}
    for r in json.loads((out / "predet" / "coco_instances_results.json").read_text()):
        x, y, w, h = r["bbox"]
        r["box"] = [x, y, x + w, y + h]
        by_image.setdefault(r["image_id"], []).append(r)
    (fragment,) = (out / "export").glob("*-detectron2.yaml")
    (weights,) = (out / "export").glob("*-detectron2.pkl")
    setups = {"rgb_array_default_anchors": ("RGB", "DefaultAnchorGenerator"),
              "bgr_default_anchors": ("BGR", "DefaultAnchorGenerator"),
              "bgr_torchvision_anchors": ("BGR", "TorchvisionAnchorGenerator")}
    report = {"fragment": fragment.name, "images": len(info["images"]), "predet_detections": sum(map(len, by_image.values()))}
    for name, (order, anchors) in setups.items():
        cfg = get_cfg()
        cfg.merge_from_file(str(fragment))
        cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = str(weights), "cpu"
        cfg.MODEL.ANCHOR_GENERATOR.NAME = anchors
        predictor = DefaultPredictor(cfg)
        agree = total_d2 = 0
        ious, score_diffs, mask_ious = [], [], []
        for image in info["images"]:
            bgr = cv2.imread(str(out / "images" / image["file_name"]))
            found = predictor(bgr if order == "BGR" else bgr[:, :, ::-1].copy())["instances"].to("cpu")
            d2 = [{"category_id": cat_ids[int(c)], "box": b.tolist(), "score": float(s), "index": i}
                  for i, (c, b, s) in enumerate(zip(found.pred_classes, found.pred_boxes.tensor, found.scores))]
            total_d2 += len(d2)
            for p, q, iou in match(by_image.get(image["id"], []), d2):
                if q is None:
                    continue
                ious.append(iou)
                score_diffs.append(abs(p["score"] - q["score"]))
                if iou > IOU_MIN and score_diffs[-1] <= SCORE_TOL:
                    agree += 1
                    if found.has("pred_masks") and "segmentation" in p:
                        rle = dict(p["segmentation"], counts=p["segmentation"]["counts"].encode())
                        mine = mask_utils.decode(rle).astype(bool)
                        mask_ious.append(mask_iou(mine, found.pred_masks[q["index"]].numpy()))
        n = report["predet_detections"]
        report[name] = {
            "detectron2_detections": total_d2, "agree": agree,
            "agree_fraction_of_predet": agree / n if n else None,
            "median_box_iou_of_pairs": float(np.median(ious)) if ious else None,
            "max_score_diff_of_pairs": max(score_diffs) if score_diffs else None,
            "mean_mask_iou_of_agreeing": float(np.mean(mask_ious)) if mask_ious else None,
            "min_mask_iou_of_agreeing": float(np.min(mask_ious)) if mask_ious else None,
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    first = steps.add_parser("prepare", help="with predet: export, images, predet's detections")
    first.add_argument("--checkpoint", type=Path, required=True)
    first.add_argument("--images", type=Path, required=True, help="a folder of images to draw from")
    first.add_argument("--out", type=Path, required=True)
    second = steps.add_parser("compare", help="with Detectron2: run the export and match")
    second.add_argument("--out", type=Path, required=True)
    second.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.checkpoint, args.images, args.out)
    else:
        print(json.dumps(compare(args.out, args.readme), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
