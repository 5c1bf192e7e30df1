"""COCO/LVIS data (predet.data.coco, predet.data.coco_json): validation messages, mask decoding,
box repair, flips, subsets, repeat factors of a dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from predet.data.coco import (
    CocoDetection,
    LVISDetection,
    build_detection_dataset,
    collate_detection,
)
from predet.data.coco_json import (
    AnnotationError,
    load_coco_json,
    subset_path,
    write_subset,
)
from predet.data.samplers import repeat_factors

W, H = 40, 30


def rect_mask(x1, y1, x2, y2) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def write_images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)


def ann(id, image_id, category_id, bbox, **kw) -> dict:
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "iscrowd": 0, "area": float(bbox[2] * bbox[3]), **kw}


def coco_fixture() -> dict:
    """Image 1: polygon, compressed RLE, uncompressed RLE, crowd, clipped box, zero-width box.
    Image 2: one instance of the rare category 7. Image 3: no annotations."""
    images = [{"id": i, "file_name": f"img{i}.png", "width": W, "height": H} for i in (1, 2, 3)]
    cats = [{"id": 7, "name": "rare"}, {"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}]
    anns = [
        ann(10, 1, 3, [10, 5, 10, 10], segmentation=[[10, 5, 20, 5, 20, 15, 10, 15]]),
        ann(11, 1, 5, [2, 3, 7, 4], segmentation=compressed_rle(rect_mask(2, 3, 9, 7))),
        ann(12, 1, 3, [25, 20, 5, 6], segmentation=uncompressed_rle(rect_mask(25, 20, 30, 26))),
        ann(13, 1, 5, [0, 0, 40, 30], segmentation=uncompressed_rle(rect_mask(0, 0, 40, 30)), iscrowd=1),
        ann(14, 1, 3, [35, 25, 10, 10], segmentation=[[35, 25, 40, 25, 40, 30, 35, 30]]),
        ann(15, 1, 5, [5, 5, 0, 8], segmentation=[[5, 5, 5, 5, 5, 13]]),
        ann(20, 2, 7, [4, 6, 12, 9], segmentation=compressed_rle(rect_mask(4, 6, 16, 15))),
    ]
    return {"info": {"description": "tiny"}, "images": images, "annotations": anns, "categories": cats}


def make_coco(tmp_path: Path, data: dict | None = None, name: str = "train.json") -> Path:
    data = coco_fixture() if data is None else data
    write_images(tmp_path, [img["file_name"] for img in data["images"]])
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# -- loading and targets ---------------------------------------------------------------


def test_masks_decode_to_expected_pixels(tmp_path):
    ds = CocoDetection(make_coco(tmp_path), tmp_path)
    image, target = ds[0]
    # uint8 from the loader (a quarter of float32's bytes between processes); the detector divides by 255
    assert image.shape == (3, H, W) and image.dtype == torch.uint8 and image.max() > 1
    masks = target["masks"].numpy()
    assert target["masks"].dtype == torch.uint8 and masks.shape == (4, H, W)
    np.testing.assert_array_equal(masks[0], rect_mask(10, 5, 20, 15))  # polygon
    np.testing.assert_array_equal(masks[1], rect_mask(2, 3, 9, 7))  # compressed RLE
    np.testing.assert_array_equal(masks[2], rect_mask(25, 20, 30, 26))  # uncompressed RLE


def test_boxes_labels_and_stats(tmp_path):
    ds = CocoDetection(make_coco(tmp_path), tmp_path)
    assert ds.cat_ids == [3, 5, 7] and ds.category_names == ["cat", "dog", "rare"]
    assert ds.contiguous_to_cat_id(3) == 7 and ds.image_ids == [1, 2, 3]
    _, target = ds[0]
    expected = [[10, 5, 20, 15], [2, 3, 9, 7], [25, 20, 30, 26], [35, 25, 40, 30]]  # last one clipped
    assert torch.equal(target["boxes"], torch.tensor(expected, dtype=torch.float32))
    assert target["labels"].tolist() == [1, 2, 1, 1]  # crowd (13) and zero-width (15) left out
    assert target["iscrowd"].tolist() == [0, 0, 0, 0] and target["image_id"] == 1
    assert target["area"].dtype == torch.float32
    assert ds.stats == dict(images=3, annotations=7, crowd=1, clipped=1, dropped=1,
                            mask_from_box=0, empty_images=1)
    assert "1 boxes clipped" in ds.stats_summary() and "1 degenerate" in ds.stats_summary()
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 6  # evaluation keeps every record


def test_empty_image_and_missing_segmentation(tmp_path):
    data = coco_fixture()
    del data["annotations"][6]["segmentation"]
    ds = CocoDetection(make_coco(tmp_path, data), tmp_path)
    assert ds.stats["mask_from_box"] == 1
    _, target = ds[1]
    np.testing.assert_array_equal(target["masks"][0].numpy(), rect_mask(4, 6, 16, 15))
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["masks"].shape == (0, H, W) and empty["area"].shape == (0,)
    _, no_masks = CocoDetection(tmp_path / "train.json", tmp_path, masks=False)[0]
    assert "masks" not in no_masks


def test_collate_and_builder(tmp_path):
    ds = build_detection_dataset(make_coco(tmp_path), tmp_path, kind="coco", train=True)
    batch = collate_detection([ds[(0, 1)], ds[(1, 2)]])
    assert batch["num_images"] == 2 and len(batch["images"]) == 2 and batch["targets"][1]["image_id"] == 2
    with pytest.raises(ValueError, match="unknown dataset kind"):
        build_detection_dataset(tmp_path / "train.json", tmp_path, kind="voc")


# -- errors ----------------------------------------------------------------------------


def error_for(tmp_path, data) -> str:
    path = make_coco(tmp_path, data)
    with pytest.raises(AnnotationError) as info:
        CocoDetection(path, tmp_path)
    return str(info.value)


def test_unknown_category_names_file_record_field(tmp_path):
    data = coco_fixture()
    data["annotations"][2]["category_id"] = 99
    msg = error_for(tmp_path, data)
    assert msg == f'{tmp_path / "train.json"}: annotations[2] (id 12): field "category_id": unknown category 99'


def test_missing_image_file(tmp_path):
    path = make_coco(tmp_path)
    (tmp_path / "img2.png").unlink()
    with pytest.raises(AnnotationError) as info:
        CocoDetection(path, tmp_path)
    msg = str(info.value)
    assert "train.json: images[1] (id 2)" in msg and 'field "file_name"' in msg and "img2.png" in msg


def test_missing_fields(tmp_path):
    data = coco_fixture()
    del data["images"][2]["height"]
    msg = error_for(tmp_path, data)
    assert "train.json: images[2] (id 3)" in msg and 'field "height": missing' in msg
    data = coco_fixture()
    data["annotations"][0]["bbox"] = [1, 2, 3]
    assert 'annotations[0] (id 10): field "bbox"' in error_for(tmp_path, data)
    data = coco_fixture()
    del data["categories"]
    assert 'train.json: field "categories": missing' in error_for(tmp_path, data)
    data = coco_fixture()
    data["annotations"][1]["image_id"] = 42
    assert 'annotations[1] (id 11): field "image_id": unknown image 42' in error_for(tmp_path, data)
    data = coco_fixture()
    data["annotations"][1]["segmentation"]["size"] = [10, 10]
    assert 'annotations[1] (id 11): field "segmentation"' in error_for(tmp_path, data)


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [],\n "annotations": [}\n')
    with pytest.raises(AnnotationError, match=r"bad\.json: line 2, column 18: invalid JSON"):
        load_coco_json(path)


# -- flips -----------------------------------------------------------------------------


def tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_is_seeded_and_consistent(tmp_path):
    ds = CocoDetection(make_coco(tmp_path), tmp_path, train=True, flip_p=0.5)
    plain_image, plain = CocoDetection(tmp_path / "train.json", tmp_path)[0]
    flips = {}
    for seed in range(8):
        image, target = ds[(0, seed)]
        again_image, again = ds[(0, seed)]
        assert torch.equal(image, again_image) and torch.equal(target["boxes"], again["boxes"])
        flips[seed] = not torch.equal(image, plain_image)
        if flips[seed]:
            assert torch.equal(image, plain_image.flip(-1))
            assert torch.equal(target["masks"], plain["masks"].flip(-1))
        for box, mask in zip(target["boxes"], target["masks"]):
            assert box.tolist() == tight_box(mask)  # every fixture box is tight
    assert any(flips.values()) and not all(flips.values())
    never = CocoDetection(tmp_path / "train.json", tmp_path, train=True, flip_p=0.0)
    assert torch.equal(never[(0, 3)][0], plain_image)


# -- subsets ---------------------------------------------------------------------------


def many_images_fixture(n: int = 20) -> dict:
    images = [{"id": 100 + i, "file_name": f"m{i}.png", "width": W, "height": H} for i in range(n)]
    anns = [ann(1000 + k, 100 + k % n, 1 + k % 2, [1, 1, 5, 5]) for k in range(3 * n)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images[::-1], "annotations": anns, "categories": cats}


def test_subset_is_deterministic_and_valid(tmp_path):
    src = tmp_path / "train.json"
    src.write_text(json.dumps(many_images_fixture()))
    out = subset_path(src, 5, 0, tmp_path / "subsets")
    assert out == tmp_path / "subsets" / "train.subset5.seed0.json"
    first = write_subset(src, 5, 0, out).read_bytes()
    again = write_subset(src, 5, 0, tmp_path / "again.json").read_bytes()
    assert first == again
    sub = load_coco_json(out)
    ids = [img["id"] for img in sub["images"]]
    assert len(ids) == 5 and ids == sorted(ids)
    assert {a["image_id"] for a in sub["annotations"]} <= set(ids)
    assert len(sub["annotations"]) == 3 * 5 and len(sub["categories"]) == 2
    other = json.loads(write_subset(src, 5, 1, tmp_path / "s1.json").read_text())
    assert [img["id"] for img in other["images"]] != ids
    bigger = json.loads(write_subset(src, 10, 0, tmp_path / "s10.json").read_text())
    assert set(ids) <= {img["id"] for img in bigger["images"]}  # nested subsets
    with pytest.raises(ValueError, match="data.subset=21: .* has 20 images"):
        write_subset(src, 21, 0, tmp_path / "too_many.json")


# -- repeat factors --------------------------------------------------------------------


def test_repeat_factors_of_dataset(tmp_path):
    ds = CocoDetection(make_coco(tmp_path), tmp_path)
    r = repeat_factors(ds, threshold=1.0)
    # categories 3 and 5 (labels 1, 2) in image 1; 7 in image 2: f = 1/3 each -> sqrt(3)
    assert r.tolist() == pytest.approx([math.sqrt(3), math.sqrt(3), 1.0], rel=1e-6)


# -- LVIS ------------------------------------------------------------------------------


def lvis_fixture() -> dict:
    url = "http://images.cocodataset.org/{}/{:012d}.jpg"
    images = [
        {"id": 1, "coco_url": url.format("train2017", 1), "width": W, "height": H,
         "neg_category_ids": [2], "not_exhaustive_category_ids": []},
        {"id": 2, "coco_url": url.format("val2017", 2), "width": W, "height": H,
         "neg_category_ids": [], "not_exhaustive_category_ids": [3]},
    ]
    cats = [
        {"id": 1, "name": "aardvark", "frequency": "r", "image_count": 1, "instance_count": 1, "synset": "a.n.01"},
        {"id": 2, "name": "bag", "frequency": "c", "image_count": 20, "instance_count": 40, "synset": "b.n.01"},
        {"id": 3, "name": "person", "frequency": "f", "image_count": 500, "instance_count": 900, "synset": "p.n.01"},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 4, 10, 8], "area": 80.0,
         "segmentation": [[3, 4, 13, 4, 13, 12, 3, 12]]},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [20, 10, 15, 15], "area": 225.0,
         "segmentation": [[20, 10, 35, 10, 35, 25, 20, 25]]},
    ]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def test_lvis_fixture_loads(tmp_path):
    write_images(tmp_path, ["train2017/000000000001.jpg", "val2017/000000000002.jpg"])
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(lvis_fixture()))
    ds = build_detection_dataset(path, tmp_path, kind="lvis")
    assert isinstance(ds, LVISDetection) and ds.coco is None
    assert ds.lvis.get_img_ids() == [1, 2] and ds.frequency == ["r", "c", "f"]
    assert ds.image_count == [1, 20, 500] and ds.labels_with_frequency("r") == [1]
    _, target = ds[0]
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[3, 4, 13, 12]]
    np.testing.assert_array_equal(target["masks"][0].numpy(), rect_mask(3, 4, 13, 12))
    assert ds.image_path(1) == tmp_path / "val2017" / "000000000002.jpg"
    bad = lvis_fixture()
    bad["images"][0]["neg_category_ids"] = [9]
    path.write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match=r'images\[0\] \(id 1\): field "neg_category_ids"'):
        LVISDetection(path, tmp_path)


# -- issue 10: every segmentation checked when the data set is built; unreadable images skipped


@pytest.mark.parametrize("segmentation,fragment", [
    ([[10, 5, "20", 5, 20, 15, 10, 15]], "polygon coordinates must be finite numbers, got '20'"),
    ([[10, 5, None, 5, 20, 15, 10, 15]], "got None"),
    ({"size": [H, W], "counts": "not an RLE string!"}, 'compressed RLE "counts" is not a valid'),
    ({"size": [H, W], "counts": "0123"}, "not height * width"),
])
def test_bad_segmentations_are_refused_when_the_set_is_built(tmp_path, segmentation, fragment):
    data = coco_fixture()
    data["annotations"][1]["segmentation"] = segmentation
    msg = error_for(tmp_path, data)
    assert msg.startswith(f'{tmp_path / "train.json"}: annotations[1] (id 11): field "segmentation": ')
    assert fragment in msg


def test_valid_compressed_rle_passes_the_string_check():
    from predet.data.coco_json import _compressed_rle_counts

    for mask in (rect_mask(2, 3, 9, 7), rect_mask(0, 0, W, H), np.zeros((H, W), np.uint8)):
        rle = compressed_rle(mask)
        counts = _compressed_rle_counts(rle["counts"])
        assert sum(counts) == H * W
        assert counts == uncompressed_rle(mask)["counts"]


@pytest.mark.parametrize("key", ["images", "categories"])
def test_a_coco_file_without_images_or_categories_is_an_error(tmp_path, key):
    data = coco_fixture()
    data[key] = []
    data["annotations"] = []
    msg = error_for(tmp_path, data)
    assert f'field "{key}": empty' in msg


@pytest.mark.parametrize("damage", ["zero-byte", "truncated"])
def test_unreadable_training_image_is_skipped_and_an_eval_image_is_an_error(tmp_path, damage):
    path = make_coco(tmp_path)
    image = tmp_path / "img2.png"
    image.write_bytes(b"" if damage == "zero-byte" else image.read_bytes()[:60])
    train = CocoDetection(path, tmp_path, train=True)
    batch = collate_detection([train[(0, 1)], train[(1, 2)], train[(2, 3)]])
    assert batch["num_images"] == 2 and [t["image_id"] for t in batch["targets"]] == [1, 3]
    assert [p for p, _ in batch["skipped"]] == [str(image)]
    with pytest.raises(AnnotationError, match=r"images\[1\] \(id 2\).*cannot read .*img2.png"):
        CocoDetection(path, tmp_path)[1]
