"""FashionDet: an offline, controlled detection benchmark (docs/method.md §5).

Fashion-MNIST garments are pasted, without overlapping each other, onto random crops of the real
photographs bundled with scikit-image. Two products:

* ``weak/``: pre-training canvases from Fashion-MNIST *train* garments (format 3: 1-3 larger,
  object-centric garments; format 2: the detection canvases' 1-6) with noisy image-level
  tags (each true tag dropped with ``drop_p``; with ``add_p`` one absent class added).
  ``labels.jsonl`` holds the noisy tags, ``clean_labels.jsonl`` the true ones plus the source
  garment indices, ``vocab.json`` the class names; ``heldout.jsonl`` lists extra canvases
  (``weak/heldout/``) that pre-training never sees, for the pretext diagnostics.
* ``det/``: COCO-format train / val / test splits from Fashion-MNIST *test* garments, with
  tight boxes and RLE masks. The 10k test garments are partitioned first, so no garment is in
  two splits; every annotation records its garment as ``fmnist_index``.

Sizes (canvases): ``tiny`` weak 64 (+16 held out), det 48/16/16; ``small`` weak 6000 (+200),
det 2000/300/500; ``full`` weak 60000 (+1000) (as many canvases as train garments), det 4000/1000/2000. Garments for each
product are drawn by walking reshuffled passes over its pool, so every garment is used before
any is reused.

Same arguments give byte-identical files: every canvas is rendered from its own numpy
``PCG64`` sub-stream, so the worker count and scheduling do not matter.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from predet.data.fashion_mnist import (
    CLASSES,
    FashionMNISTNotFound,
    find_fashion_mnist,
    load_fashion_mnist,
)

FORMAT_VERSION = 3  # 2: adds weak/heldout; 3: heldout_clean.jsonl, object-centric weak canvases
FORMAT_VERSIONS = (2, 3)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"weak": 64, "weak_heldout": 16, "det": {"train": 48, "val": 16, "test": 16}},
    "small": {"weak": 6000, "weak_heldout": 200, "det": {"train": 2000, "val": 300, "test": 500}},
    "full": {"weak": 60000, "weak_heldout": 1000, "det": {"train": 4000, "val": 1000, "test": 2000}},
}
DET_SPLITS = ("train", "val", "test")
MAX_GARMENTS = 6
SCALE_RANGE = (0.2, 0.6)  # garment side as a fraction of the canvas side
# How the weak (pre-training) canvases are composed, per format version. Version 2 used the
# detection canvases' clutter (1-6 small garments), in which a ResNet-18 trained from scratch on
# 2 CPU cores never learned the *clean* tags (method.md §5 calibration). Version 3 makes them
# object-centric, as ImageNet and hashtag photos mostly are: 1-3 larger garments.
WEAK_COMPOSITION = {
    2: {"max_garments": MAX_GARMENTS, "scale_range": SCALE_RANGE},
    3: {"max_garments": 3, "scale_range": (0.35, 0.7)},
}
PLACEMENT_TRIES = 30
MASK_THRESHOLD = 25  # resized garment pixel > 25 (about 0.1 of 255) belongs to the mask
BACKGROUND_MAX_SIDE = 512  # big photographs are shrunk once so each crop is cheap
# Photographs bundled inside scikit-image (no download needed); synthetic images are left out.
BACKGROUND_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
# Sub-stream ids: spawn_key (stream, 0) plans a product, (stream, 1, i) renders its canvas i.
STREAMS = {"partition": 0, "weak": 1, "det/train": 2, "det/val": 3, "det/test": 4, "weak/heldout": 5}


def is_current_build(data: str | Path) -> bool:
    """A finished FashionDet build in this builder's format (older ones lack the held-out set)."""
    summary = Path(data) / "fashiondet.json"
    return summary.exists() and json.loads(summary.read_text()).get("format_version") == FORMAT_VERSION


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


# ---------------------------------------------------------------------------------------------
# Noisy tags


def corrupt_tags(
    clean: Sequence[int], rng: np.random.Generator, drop_p: float, add_p: float, num_classes: int = len(CLASSES)
) -> list[int]:
    """Noisy version of a set of class ids: each dropped with ``drop_p``; with ``add_p`` one
    class that is not present is added (hashtag-style noise: missing and spurious tags)."""
    clean = sorted(set(int(c) for c in clean))
    kept = [c for c, u in zip(clean, rng.random(len(clean))) if u >= drop_p]
    absent = [c for c in range(num_classes) if c not in clean]
    if absent and rng.random() < add_p:
        kept.append(int(absent[rng.integers(len(absent))]))
    return sorted(kept)


# ---------------------------------------------------------------------------------------------
# Rendering one canvas


def load_backgrounds() -> list[np.ndarray]:
    """The bundled scikit-image photographs as RGB uint8, shrunk to at most 512 px short side."""
    import skimage.data

    out = []
    for name in BACKGROUND_NAMES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3].astype(np.uint8)
        short = min(img.shape[:2])
        if short > BACKGROUND_MAX_SIDE:
            h, w = (round(s * BACKGROUND_MAX_SIDE / short) for s in img.shape[:2])
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
        out.append(img)
    return out


def random_background(rng: np.random.Generator, backgrounds: list[np.ndarray], canvas: int) -> np.ndarray:
    """A random square crop (30-100 % of the short side) of a random photograph, maybe flipped."""
    img = backgrounds[rng.integers(len(backgrounds))]
    h, w = img.shape[:2]
    side = int(rng.integers(max(1, round(0.3 * min(h, w))), min(h, w) + 1))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    crop = Image.fromarray(img).resize((canvas, canvas), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    out = np.asarray(crop)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


@dataclass
class Placement:
    """One pasted garment: which candidate it was, where, and its resized intensity."""

    slot: int
    x: int
    y: int
    alpha: np.ndarray  # uint8 [side, side], the bilinear-resized 28x28 glyph

    def mask(self, canvas: int) -> np.ndarray:
        out = np.zeros((canvas, canvas), dtype=bool)
        s = self.alpha.shape[0]
        out[self.y : self.y + s, self.x : self.x + s] = self.alpha > MASK_THRESHOLD
        return out


def place_garments(rng: np.random.Generator, glyphs: Sequence[np.ndarray], canvas: int,
                   scale_range: Sequence[float] = SCALE_RANGE) -> list[Placement]:
    """Random scale and position per garment; a garment whose non-zero pixels would touch an
    already placed one is retried, then dropped, so every visible mask is a whole garment."""
    lo, hi = (round(f * canvas) for f in scale_range)
    occupied = np.zeros((canvas, canvas), dtype=bool)
    placed = []
    for slot, glyph in enumerate(glyphs):
        side = int(rng.integers(lo, hi + 1))
        alpha = np.asarray(Image.fromarray(glyph).resize((side, side), Image.BILINEAR))
        support = alpha > 0
        if not (alpha > MASK_THRESHOLD).any():
            continue
        for _ in range(PLACEMENT_TRIES):
            x = int(rng.integers(0, canvas - side + 1))
            y = int(rng.integers(0, canvas - side + 1))
            window = occupied[y : y + side, x : x + side]
            if not (window & support).any():
                window |= support
                placed.append(Placement(slot, x, y, alpha))
                break
    return placed


def composite(rng: np.random.Generator, background: np.ndarray, placements: list[Placement]) -> np.ndarray:
    """Paste with alpha = garment intensity in a random colour that contrasts with the
    background under it (light on dark, dark on light), so every garment stays visible."""
    out = background.astype(np.float32)
    for p in placements:
        s = p.alpha.shape[0]
        region = out[p.y : p.y + s, p.x : p.x + s]
        luminance = float(region.mean())
        colour = rng.uniform(0, 90, 3) if luminance > 127 else rng.uniform(165, 255, 3)
        a = (p.alpha.astype(np.float32) / 255.0)[..., None]
        region[...] = region * (1 - a) + colour.astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tight_box(mask: np.ndarray) -> list[float]:
    """COCO xywh of the smallest box holding every mask pixel (w = max col - min col + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed COCO RLE with ``counts`` as str so it can go into json."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class Task:
    """Everything one canvas depends on besides the loaded data (picklable for workers)."""

    product: str  # "weak" or "det"
    path: str  # absolute PNG path to write
    seed_key: tuple[int, ...]
    garments: tuple[int, ...]  # candidate indices into the source split
    canvas: int
    drop_p: float
    add_p: float
    scale_range: tuple[float, float] = SCALE_RANGE


class Renderer:
    """Holds the garments and backgrounds; renders and writes one canvas per task."""

    def __init__(self, fashion_mnist_dir: str | Path):
        self.garments = {
            "weak": load_fashion_mnist("train", root=fashion_mnist_dir, download=False),
            "det": load_fashion_mnist("test", root=fashion_mnist_dir, download=False),
        }
        self.backgrounds = load_backgrounds()

    def render(self, task: Task, seed: int) -> dict:
        rng = _rng(seed, *task.seed_key)
        images, labels = self.garments[task.product]
        background = random_background(rng, self.backgrounds, task.canvas)
        placements = place_garments(rng, [images[i] for i in task.garments], task.canvas, task.scale_range)
        Image.fromarray(composite(rng, background, placements)).save(task.path, format="PNG", compress_level=6)
        indices = [task.garments[p.slot] for p in placements]
        classes = [int(labels[i]) for i in indices]
        if task.product == "weak":
            noisy = corrupt_tags(classes, rng, task.drop_p, task.add_p)
            return {"fmnist_index": indices, "clean": sorted(set(classes)), "noisy": noisy}
        objects = []
        for p, index, cls in zip(placements, indices, classes):
            mask = p.mask(task.canvas)
            objects.append(
                {
                    "category_id": cls + 1,
                    "bbox": tight_box(mask),
                    "area": int(mask.sum()),
                    "segmentation": encode_mask(mask),
                    "fmnist_index": int(index),
                }
            )
        return {"objects": objects}


_WORKER: tuple[Renderer, int] | None = None


def _init_worker(fashion_mnist_dir: str, seed: int) -> None:
    global _WORKER
    _WORKER = (Renderer(fashion_mnist_dir), seed)


def _render_in_worker(task: Task) -> dict:
    renderer, seed = _WORKER
    return renderer.render(task, seed)


# ---------------------------------------------------------------------------------------------
# Planning (sequential, cheap): which garments each canvas gets


def garment_stream(rng: np.random.Generator, pool: np.ndarray):
    """Endless garment indices: reshuffled passes over the pool, so use is balanced."""
    while True:
        yield from rng.permutation(pool).tolist()


def plan_canvases(rng: np.random.Generator, pool: np.ndarray, count: int,
                  max_garments: int = MAX_GARMENTS) -> list[tuple[int, ...]]:
    """1..max_garments candidate garments for each of ``count`` canvases."""
    stream = garment_stream(rng, pool)
    sizes = rng.integers(1, max_garments + 1, size=count)
    return [tuple(next(stream) for _ in range(int(n))) for n in sizes]


def partition_pool(rng: np.random.Generator, n_garments: int, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Split garment indices into disjoint pools sized in proportion to each split's canvases."""
    order = rng.permutation(n_garments)
    total = sum(counts.values())
    pools, start = {}, 0
    for i, split in enumerate(DET_SPLITS):
        stop = n_garments if i == len(DET_SPLITS) - 1 else start + round(n_garments * counts[split] / total)
        pools[split] = np.sort(order[start:stop])
        start = stop
    return pools


# ---------------------------------------------------------------------------------------------
# Building


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=indent) + "\n")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


INCOMPLETE_MARKER = ".fashiondet-incomplete"


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an old build; with ``overwrite``, or when the old build was
    interrupted (its marker file is still there), remove only what a build writes."""
    owned = [out / "weak", out / "det", out / "fashiondet.json", out / INCOMPLETE_MARKER]
    existing = [p for p in owned if p.exists()]
    if existing and not overwrite and not (out / INCOMPLETE_MARKER).exists():
        raise FileExistsError(
            f"{out} already holds a FashionDet build ({existing[0].name}); use overwrite=True (--overwrite)"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE_MARKER).touch()


def _run_tasks(tasks: list[Task], renderer, pool, seed: int, desc: str, progress: bool) -> list[dict]:
    if pool is not None:
        results = pool.imap(_render_in_worker, tasks, chunksize=16)
    else:
        results = (renderer.render(t, seed) for t in tasks)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(tasks), desc=desc, unit="img", file=sys.stderr)
    return list(results)


def _weak_tasks(out: Path, seed: int, n_garments: int, count: int, canvas: int, drop_p: float, add_p: float,
                composition: dict, split: str = "weak", folder: str = "images"):
    stream = STREAMS[split]
    plans = plan_canvases(_rng(seed, stream, 0), np.arange(n_garments), count, composition["max_garments"])
    scale_range = tuple(composition["scale_range"])
    return [
        Task("weak", str(out / folder / f"{i:06d}.png"), (stream, 1, i), g, canvas, drop_p, add_p, scale_range)
        for i, g in enumerate(plans)
    ]


def _weak_records(tasks: list[Task], results: list[dict], out: Path) -> tuple[list, list, dict]:
    noisy, clean = [], []
    true_tags = dropped = added = 0
    for task, res in zip(tasks, results):
        image = str(Path(task.path).relative_to(out).as_posix())
        noisy.append({"image": image, "labels": [CLASSES[c] for c in res["noisy"]]})
        clean_names = [CLASSES[c] for c in res["clean"]]
        clean.append({"image": image, "labels": clean_names, "fmnist_index": res["fmnist_index"]})
        true_tags += len(res["clean"])
        dropped += len(set(res["clean"]) - set(res["noisy"]))
        added += len(set(res["noisy"]) - set(res["clean"]))
    stats = {
        "images": len(tasks),
        "garments": sum(len(r["fmnist_index"]) for r in results),
        "true_tags": true_tags,
        "measured_drop_rate": dropped / max(true_tags, 1),
        "measured_add_rate": added / max(len(tasks), 1),
        "images_without_noisy_labels": sum(1 for r in results if not r["noisy"]),
    }
    return noisy, clean, stats


def _coco(tasks: list[Task], results: list[dict], image_root: Path, canvas: int) -> dict:
    images, annotations = [], []
    for image_id, (task, res) in enumerate(zip(tasks, results), start=1):
        file_name = Path(task.path).relative_to(image_root).as_posix()
        images.append({"id": image_id, "file_name": file_name, "width": canvas, "height": canvas})
        for obj in res["objects"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    categories = [{"id": i + 1, "name": name, "supercategory": "garment"} for i, name in enumerate(CLASSES)]
    return {
        "info": {"description": "FashionDet (Fashion-MNIST test garments on scikit-image photographs)"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def build_fashiondet(
    out_dir: str | Path,
    size: str = "small",
    seed: int = 0,
    canvas: int = 160,
    drop_p: float = 0.3,
    add_p: float = 0.2,
    fashion_mnist_root: str | Path | None = None,
    progress: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
    format_version: int = FORMAT_VERSION,
) -> dict:
    """Build the weak pre-training set and the three detection splits under ``out_dir``.

    ``workers`` = processes rendering canvases (None: one per CPU, up to 8, and none for builds
    under 500 canvases); the output does not depend on it. ``format_version=2`` rebuilds the
    earlier format's images byte for byte (cluttered weak canvases). Returns a summary with counts,
    measured tag-noise rates and paths; the same summary, minus paths, goes to fashiondet.json.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if not (0 <= drop_p <= 1 and 0 <= add_p <= 1):
        raise ValueError("drop_p and add_p must lie in [0, 1]")
    if canvas < 32:
        raise ValueError("canvas must be at least 32 pixels")
    if format_version not in FORMAT_VERSIONS:
        raise ValueError(f"format_version must be one of {FORMAT_VERSIONS}, got {format_version!r}")
    composition = WEAK_COMPOSITION[format_version]
    start_time = time.perf_counter()
    out = Path(out_dir)
    fmnist_dir = find_fashion_mnist(fashion_mnist_root)
    _prepare_out_dir(out, overwrite)
    sizes = SIZES[size]
    renderer = Renderer(fmnist_dir)
    n_train, n_test = (len(renderer.garments[p][1]) for p in ("weak", "det"))

    weak_dir, det_dir = out / "weak", out / "det"
    (weak_dir / "images").mkdir(parents=True)
    (weak_dir / "heldout").mkdir(parents=True)
    weak_tasks = _weak_tasks(weak_dir, seed, n_train, sizes["weak"], canvas, drop_p, add_p, composition)
    # Held-out canvases, never trained on: the pretext diagnostics are measured on them.
    heldout_tasks = _weak_tasks(weak_dir, seed, n_train, sizes["weak_heldout"], canvas, drop_p, add_p,
                                composition, "weak/heldout", "heldout")
    pools = partition_pool(_rng(seed, STREAMS["partition"], 0), n_test, sizes["det"])
    det_tasks = {}
    for split in DET_SPLITS:
        (det_dir / "images" / split).mkdir(parents=True)
        stream = STREAMS[f"det/{split}"]
        plans = plan_canvases(_rng(seed, stream, 0), pools[split], sizes["det"][split])
        det_tasks[split] = [
            Task("det", str(det_dir / "images" / split / f"{i:06d}.png"), (stream, 1, i), g, canvas, drop_p, add_p)
            for i, g in enumerate(plans)
        ]

    total = len(weak_tasks) + len(heldout_tasks) + sum(len(t) for t in det_tasks.values())
    if workers is None:
        workers = 1 if total < 500 else min(os.cpu_count() or 1, 8)
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(str(fmnist_dir), seed))
    try:
        weak_results = _run_tasks(weak_tasks, renderer, pool, seed, "weak", progress)
        heldout_results = _run_tasks(heldout_tasks, renderer, pool, seed, "weak/heldout", progress)
        det_results = {s: _run_tasks(det_tasks[s], renderer, pool, seed, f"det/{s}", progress) for s in DET_SPLITS}
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    noisy, clean, weak_stats = _weak_records(weak_tasks, weak_results, weak_dir)
    _write_jsonl(weak_dir / "labels.jsonl", noisy)
    _write_jsonl(weak_dir / "clean_labels.jsonl", clean)
    _write_json(weak_dir / "vocab.json", list(CLASSES))
    heldout, heldout_clean, heldout_stats = _weak_records(heldout_tasks, heldout_results, weak_dir)
    _write_jsonl(weak_dir / "heldout.jsonl", heldout)
    if format_version >= 3:  # the truth, for the held-out weak-label mAP of the diagnostics
        _write_jsonl(weak_dir / "heldout_clean.jsonl", heldout_clean)
    (det_dir / "annotations").mkdir(parents=True)
    det_stats = {}
    for split in DET_SPLITS:
        coco = _coco(det_tasks[split], det_results[split], det_dir / "images", canvas)
        _write_json(det_dir / "annotations" / f"{split}.json", coco, indent=None)
        det_stats[split] = {
            "images": len(coco["images"]),
            "annotations": len(coco["annotations"]),
            "garment_pool": int(len(pools[split])),
            "distinct_garments": len({a["fmnist_index"] for a in coco["annotations"]}),
        }

    record = {
        "format_version": format_version,
        "args": {"size": size, "seed": seed, "canvas": canvas, "drop_p": drop_p, "add_p": add_p},
        "constants": {
            "max_garments": MAX_GARMENTS,
            "scale_range": list(SCALE_RANGE),
            "weak_max_garments": composition["max_garments"],
            "weak_scale_range": list(composition["scale_range"]),
            "mask_threshold": MASK_THRESHOLD,
            "placement_tries": PLACEMENT_TRIES,
        },
        "backgrounds": list(BACKGROUND_NAMES),
        "classes": list(CLASSES),
        "weak": weak_stats,
        "weak_heldout": {"images": heldout_stats["images"], "garments": heldout_stats["garments"]},
        "det": det_stats,
    }
    _write_json(out / "fashiondet.json", record)
    (out / INCOMPLETE_MARKER).unlink()
    paths = {
        "out_dir": str(out),
        "summary": str(out / "fashiondet.json"),
        "weak_labels": str(weak_dir / "labels.jsonl"),
        "weak_clean_labels": str(weak_dir / "clean_labels.jsonl"),
        "weak_vocab": str(weak_dir / "vocab.json"),
        "weak_heldout": str(weak_dir / "heldout.jsonl"),
        "weak_heldout_clean": str(weak_dir / "heldout_clean.jsonl") if format_version >= 3 else None,
        "det_images": str(det_dir / "images"),
        "det_annotations": {s: str(det_dir / "annotations" / f"{s}.json") for s in DET_SPLITS},
        "fashion_mnist": str(fmnist_dir),
    }
    return {**record, "paths": paths, "workers": workers, "seconds": time.perf_counter() - start_time}


# ---------------------------------------------------------------------------------------------
# Command line: predet data fashiondet ...


def add_cli_arguments(parser) -> None:
    """Options of ``predet data fashiondet``."""
    parser.add_argument("--out", required=True, help="output folder (weak/, det/, fashiondet.json)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="tiny, small or full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canvas", type=int, default=160, help="canvas side in pixels")
    parser.add_argument("--drop-p", type=float, default=0.3, help="chance each true weak tag is dropped")
    parser.add_argument("--add-p", type=float, default=0.2, help="chance one false weak tag is added")
    parser.add_argument(
        "--fashion-mnist", default=None, metavar="DIR", help="folder with the four Fashion-MNIST IDX files"
    )
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPUs, up to 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build in --out")
    parser.add_argument("--format-version", type=int, choices=FORMAT_VERSIONS, default=FORMAT_VERSION,
                        help="2 rebuilds the earlier format (cluttered weak canvases) byte for byte")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main_from_args(args) -> int:
    """Run a build from parsed arguments and print a short summary. Exit code 2 when
Fashion-MNIST is missing or --out holds a finished build and --overwrite is not given."""
    try:
        summary = build_fashiondet(
            args.out,
            size=args.size,
            seed=args.seed,
            canvas=args.canvas,
            drop_p=args.drop_p,
            add_p=args.add_p,
            fashion_mnist_root=args.fashion_mnist,
            progress=not args.no_progress,
            workers=args.workers,
            overwrite=args.overwrite,
            format_version=args.format_version,
        )
    except (FashionMNISTNotFound, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    weak = summary["weak"]
    print(
        f"FashionDet ({summary['args']['size']}, seed {summary['args']['seed']}) in {args.out}: "
        f"weak {weak['images']} images, drop rate {weak['measured_drop_rate']:.3f}, "
        f"add rate {weak['measured_add_rate']:.3f}; det "
        + ", ".join(f"{s} {d['images']} images / {d['annotations']} boxes" for s, d in summary["det"].items())
        + f"; {summary['seconds']:.1f}s"
    )
    return 0
