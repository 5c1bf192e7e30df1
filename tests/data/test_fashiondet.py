"""FashionDet builder: determinism, exact boxes/masks, disjoint garment pools, tag-noise rates,
and a helpful error when Fashion-MNIST is missing."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from predet.data import fashion_mnist
from predet.data.fashion_mnist import (
    CLASSES,
    FashionMNISTNotFound,
    load_fashion_mnist,
    read_idx,
)
from predet.data.fashiondet import (
    DET_SPLITS,
    SIZES,
    add_cli_arguments,
    build_fashiondet,
    corrupt_tags,
    main_from_args,
    partition_pool,
    tight_box,
)

# pycocotools' decode trips a numpy 2 DeprecationWarning inside the library, not in our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two seed-0 tiny builds (one in-process, one with a 2-process pool) and one seed-1 build."""
    root = tmp_path_factory.mktemp("fashiondet")
    a = build_fashiondet(root / "a", size="tiny", seed=0, progress=False, workers=1)
    b = build_fashiondet(root / "b", size="tiny", seed=0, progress=False, workers=2)
    c = build_fashiondet(root / "c", size="tiny", seed=1, progress=False, workers=1)
    return {"a": (root / "a", a), "b": (root / "b", b), "c": (root / "c", c)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(builds):
    a, b = _files(builds["a"][0]), _files(builds["b"][0])
    assert sorted(a) == sorted(b)
    assert len(a) == 64 + 16 + 48 + 16 + 16 + 5 + 3 + 1  # images, weak jsonl/vocab files, coco, summary
    for name in a:
        assert a[name] == b[name], name


def test_different_seed_differs(builds):
    a, c = _files(builds["a"][0]), _files(builds["c"][0])
    assert sorted(a) == sorted(c)
    assert a["weak/images/000000.png"] != c["weak/images/000000.png"]
    assert a["det/annotations/train.json"] != c["det/annotations/train.json"]


def test_layout_counts_and_summary(builds):
    out, summary = builds["a"]
    sizes = SIZES["tiny"]
    assert json.loads((out / "weak" / "vocab.json").read_text()) == list(CLASSES)
    noisy = _read_jsonl(out / "weak" / "labels.jsonl")
    assert len(noisy) == sizes["weak"]
    heldout = _read_jsonl(out / "weak" / "heldout.jsonl")
    assert len(heldout) == sizes["weak_heldout"]
    assert not {r["image"] for r in heldout} & {r["image"] for r in noisy}
    assert all((out / "weak" / r["image"]).is_file() for r in heldout)
    heldout_clean = _read_jsonl(out / "weak" / "heldout_clean.jsonl")
    assert [r["image"] for r in heldout_clean] == [r["image"] for r in heldout]
    assert noisy[0]["image"] == "images/000000.png"
    for rec in noisy:
        assert set(rec) == {"image", "labels"}
        assert (out / "weak" / rec["image"]).is_file()
        assert set(rec["labels"]) <= set(CLASSES)
    with Image.open(out / "weak" / noisy[0]["image"]) as img:
        assert img.mode == "RGB" and img.size == (160, 160)
    record = json.loads((out / "fashiondet.json").read_text())
    assert record["args"] == {"size": "tiny", "seed": 0, "canvas": 160, "drop_p": 0.3, "add_p": 0.2}
    for split in DET_SPLITS:
        coco = json.loads((out / "det" / "annotations" / f"{split}.json").read_text())
        assert len(coco["images"]) == sizes["det"][split] == record["det"][split]["images"]
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert [c["name"] for c in coco["categories"]] == list(CLASSES)
        for im in coco["images"]:
            assert im["file_name"].startswith(f"{split}/")
            assert (out / "det" / "images" / im["file_name"]).is_file()
            assert (im["width"], im["height"]) == (160, 160)
    assert summary["weak"] == record["weak"] and summary["det"] == record["det"]
    assert Path(summary["paths"]["det_annotations"]["val"]) == out / "det" / "annotations" / "val.json"


def test_boxes_are_tight_boxes_of_the_rle_masks(builds):
    out, _ = builds["a"]
    _, test_labels = load_fashion_mnist("test")
    for split in DET_SPLITS:
        coco = COCO(str(out / "det" / "annotations" / f"{split}.json"))
        assert coco.getAnnIds(), split
        for ann in coco.loadAnns(coco.getAnnIds()):
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert mask.shape == (160, 160)
            assert isinstance(ann["segmentation"]["counts"], str)
            ys, xs = np.nonzero(mask)
            expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == [float(v) for v in expected] == tight_box(mask)
            assert ann["area"] == int(mask.sum()) > 0
            assert ann["iscrowd"] == 0
            assert ann["category_id"] == test_labels[ann["fmnist_index"]] + 1


def test_garments_in_one_canvas_do_not_overlap(builds):
    out, _ = builds["a"]
    coco = COCO(str(out / "det" / "annotations" / "train.json"))
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        masks = [mask_utils.decode(a["segmentation"]).astype(np.int32) for a in anns]
        if masks:
            assert np.sum(masks, axis=0).max() == 1


def test_detection_splits_share_no_garment(builds):
    out, _ = builds["a"]
    used = {}
    for split in DET_SPLITS:
        coco = json.loads((out / "det" / "annotations" / f"{split}.json").read_text())
        used[split] = {a["fmnist_index"] for a in coco["annotations"]}
        assert all(0 <= i < 10000 for i in used[split])
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_partition_pool_is_disjoint_and_complete():
    pools = partition_pool(np.random.default_rng(0), 10000, {"train": 2000, "val": 300, "test": 500})
    together = np.concatenate([pools[s] for s in DET_SPLITS])
    assert len(together) == 10000 and len(np.unique(together)) == 10000
    assert len(pools["train"]) == round(10000 * 2000 / 2800)


def test_weak_garments_come_from_the_train_split(builds):
    out, _ = builds["a"]
    _, train_labels = load_fashion_mnist("train")
    clean = _read_jsonl(out / "weak" / "clean_labels.jsonl")
    noisy = _read_jsonl(out / "weak" / "labels.jsonl")
    assert [r["image"] for r in clean] == [r["image"] for r in noisy]
    for c, n in zip(clean, noisy):
        assert 1 <= len(c["fmnist_index"]) <= 6
        assert all(0 <= i < 60000 for i in c["fmnist_index"])
        present = {CLASSES[train_labels[i]] for i in c["fmnist_index"]}
        assert set(c["labels"]) == present
        assert len(set(n["labels"]) - present) <= 1


def test_corruption_rates_match_configuration():
    rng = np.random.default_rng(123)
    drop_p, add_p, draws = 0.3, 0.2, 20000
    true_tags = dropped = added = 0
    for _ in range(draws):
        clean = sorted(rng.choice(10, size=rng.integers(1, 7), replace=False).tolist())
        noisy = corrupt_tags(clean, rng, drop_p, add_p)
        extra = set(noisy) - set(clean)
        assert len(extra) <= 1 and noisy == sorted(noisy)
        true_tags += len(clean)
        dropped += len(set(clean) - set(noisy))
        added += len(extra)
    assert abs(dropped / true_tags - drop_p) < 0.02
    assert abs(added / draws - add_p) < 0.02


def test_corruption_extremes():
    rng = np.random.default_rng(0)
    assert corrupt_tags([3, 1], rng, 0.0, 0.0) == [1, 3]
    assert corrupt_tags([3, 1], rng, 1.0, 0.0) == []
    assert corrupt_tags(list(range(10)), rng, 0.0, 1.0) == list(range(10))  # nothing absent to add


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_SEARCH_PATHS", [])
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_ENABLED", False)
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    with pytest.warns(UserWarning), pytest.raises(FashionMNISTNotFound) as err:
        load_fashion_mnist("test", root=tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--fashion-mnist DIR" in message and "PREDET_FASHION_MNIST=DIR" in message
    with pytest.warns(UserWarning), pytest.raises(FashionMNISTNotFound):
        build_fashiondet(tmp_path / "out", size="tiny", progress=False)
    assert not (tmp_path / "out").exists()


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_reader_plain_gzip_and_bad_magic(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    labels = np.array([9, 0, 4])
    for split, (img_name, lbl_name) in fashion_mnist.FILES.items():
        _write_idx(tmp_path / img_name, images, gz=False)
        _write_idx(tmp_path / f"{lbl_name}.gz", labels, gz=True)
    got_images, got_labels = load_fashion_mnist("train", root=tmp_path)
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [9, 0, 4]
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "train-images-idx3-ubyte", ndim=1)
    (tmp_path / "broken").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "broken", ndim=3)


def test_installed_fashion_mnist_loads():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10


def test_cli_helpers(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "fd"), "--size", "tiny", "--seed", "3", "--no-progress"])
    assert (args.canvas, args.drop_p, args.add_p, args.fashion_mnist) == (160, 0.3, 0.2, None)
    assert main_from_args(args) == 0
    assert "weak 64 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "fd" / "fashiondet.json").read_text())["args"]["seed"] == 3
    assert main_from_args(args) == 2  # a finished build is not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    args.overwrite = True
    assert main_from_args(args) == 0


def test_interrupted_build_is_replaced(tmp_path):
    out = tmp_path / "fd"
    (out / "weak" / "images").mkdir(parents=True)
    (out / "weak" / "images" / "999999.png").write_bytes(b"stale")
    (out / ".fashiondet-incomplete").touch()
    (out / "unrelated.txt").write_text("kept")
    build_fashiondet(out, size="tiny", progress=False)
    assert not (out / "weak" / "images" / "999999.png").exists()
    assert not (out / ".fashiondet-incomplete").exists()
    assert (out / "unrelated.txt").read_text() == "kept"


def test_format_3_weak_canvases_are_object_centric_and_format_2_is_kept(builds, tmp_path):
    """Format 3 puts 1-3 garments on a weak canvas; format 2 (by flag) keeps the cluttered 1-6,
    and the detection splits are the same in both."""
    old_dir = tmp_path / "v2"
    build_fashiondet(old_dir, size="tiny", seed=0, progress=False, workers=1, format_version=2)
    new_dir = builds["a"][0]
    count = lambda d: [len(r["fmnist_index"]) for r in _read_jsonl(d / "weak" / "clean_labels.jsonl")]
    assert max(count(new_dir)) <= 3 < max(count(old_dir))
    assert not (old_dir / "weak" / "heldout_clean.jsonl").exists()
    assert json.loads((old_dir / "fashiondet.json").read_text())["format_version"] == 2
    old, new = _files(old_dir / "det"), _files(new_dir / "det")
    assert old.keys() == new.keys() and all(old[k] == new[k] for k in old)
    with pytest.raises(ValueError, match="format_version"):
        build_fashiondet(tmp_path / "v1", size="tiny", format_version=1, progress=False)
