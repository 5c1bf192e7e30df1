"""``predet predict``: a fine-tuned detector on unlabelled images, written as a COCO results file.

The images are a folder (searched recursively; ids 1..N in sorted file order) or a COCO
image-info json such as COCO test-dev's (``images`` with ``id`` and ``file_name``). Besides
``coco_instances_results.json`` the output folder gets ``image_info.json``, the images and
categories the results refer to, so a folder's made-up ids can be mapped back to files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from predet.config import ConfigError
from predet.data.images import image_size, open_rgb
from predet.engine.runfolder import check_writable
from predet.evaluation.coco import RESULTS_FILE, write_coco_results, write_results_json
from predet.evaluation.inference import eval_mode, inference_on_dataset
from predet.evaluation.visualize import draw_detections

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def folder_records(folder: Path) -> list[dict]:
    """COCO image records for every image file under ``folder``, ids 1..N in sorted path order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{folder}: no image files ({' '.join(IMAGE_SUFFIXES)})")
    records = []
    for image_id, path in enumerate(files, start=1):
        try:
            width, height = image_size(path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for one meaning: unusable
            raise ConfigError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
        records.append({"id": image_id, "file_name": path.relative_to(folder).as_posix(),
                        "width": width, "height": height})
    return records


def info_records(path: Path) -> list[dict]:
    """The ``images`` of a COCO image-info (or annotation) json, checked for id and file_name."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable json ({exc})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise ConfigError(f"{path}: expected a COCO image-info json with a non-empty 'images' list")
    for i, record in enumerate(images):
        if not isinstance(record, dict) or not isinstance(record.get("id"), int) or not record.get("file_name"):
            raise ConfigError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name'")
    return images


class ImageRecords(Dataset):
    """Images of COCO records as (uint8 tensor, {"image_id"}), the detection datasets' layout;
    carries the detector's ``cat_ids`` so inference maps labels to category ids."""

    def __init__(self, records: list[dict], root: Path, cat_ids, category_names):
        self.records, self.root = records, Path(root)
        self.cat_ids, self.category_names = list(cat_ids), list(category_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        path = self.root / record["file_name"]
        try:
            image = open_rgb(path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types (a bomb is not an OSError)
            raise ConfigError(f"{path}: cannot read image {record['id']} ({type(exc).__name__}: {exc})") from None
        return pil_to_tensor(image), {"image_id": int(record["id"])}


def set_score_thresh(detector, score_thresh: float) -> None:
    """Keep detections down to ``score_thresh`` (the detector drops lower ones before NMS)."""
    if hasattr(detector, "roi_heads"):
        detector.roi_heads.score_thresh = score_thresh
    else:
        detector.score_thresh = score_thresh


@dataclass
class PredictResult:
    results_path: Path
    image_info_path: Path
    images: int
    detections: int
    drawings: list[Path]


def predict(checkpoint, images, out_dir, score_thresh: float | None = None, image_root=None,
            device: str = "auto", batch_size: int = 2, visualize_n: int = 0, progress: bool = True,
            num_workers: int = 2) -> PredictResult:
    """Detections of a ``predet finetune`` checkpoint for a folder of images or an image-info json.
    Under torchrun every rank runs its share of the images; rank 0 gathers and writes them."""
    from predet.engine.distributed import barrier
    from predet.engine.launch import launched
    from predet.modeling.detectors import load_detector

    if batch_size <= 0 or num_workers < 0:
        raise ConfigError(f"--batch-size {batch_size}, --num-workers {num_workers}: the batch size must be "
                          "positive and the workers >= 0")
    check_writable(out_dir, "--out")  # before the whole inference runs, not after
    source = Path(images)
    if source.is_dir():
        records, root = folder_records(source), source
    elif source.is_file():
        records, root = info_records(source), Path(image_root) if image_root else source.parent
    else:
        raise ConfigError(f"{images}: no such image folder or image-info json")
    with launched(device, "--device") as where:
        detector, cfg, extra = load_detector(checkpoint)
        if score_thresh is not None:
            set_score_thresh(detector, score_thresh)
        names = list(extra.get("category_names") or [str(c) for c in extra["cat_ids"]])
        dataset = ImageRecords(records, root, extra["cat_ids"], names)
        detector.to(where.device)
        run = inference_on_dataset(detector, dataset, where.device, batch_size, num_workers, progress)
        results = run.results
        if score_thresh is not None:
            results = [r for r in results if r["score"] >= score_thresh]
        out = Path(out_dir)
        results_path, info_path, drawings = out / RESULTS_FILE, out / "image_info.json", []
        if where.is_main:
            for path in (results_path, info_path):
                if path.exists():
                    logger.warning("%s exists: replacing it with this run's", path)
            write_coco_results(results, results_path)
            categories = [{"id": int(c), "name": n} for c, n in zip(extra["cat_ids"], names)]
            write_results_json({"images": records, "categories": categories}, info_path)
            drawings = draw_predictions(detector, dataset, visualize_n, out / "visualize", where.device,
                                        0.5 if score_thresh is None else score_thresh)
        barrier()
    return PredictResult(results_path, info_path, len(records), len(results), drawings)


@torch.no_grad()
def draw_predictions(detector, dataset: ImageRecords, n: int, out_dir: Path, device, score_thresh: float):
    """PNGs of the first ``n`` images with their detections (no ground truth to draw)."""
    paths = []
    with eval_mode(detector):
        for index in range(min(n, len(dataset))):
            image, target = dataset[index]
            prediction = detector([image.to(device)])[0]
            drawing = draw_detections(image, prediction, None, dataset.category_names, score_thresh)
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"pred_{target['image_id']}.png"
            drawing.save(path)
            paths.append(path)
    return paths
