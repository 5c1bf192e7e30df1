"""COCO / LVIS evaluation: our numbers (faster-coco-eval) are pycocotools' and lvis' numbers, end to end."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from faster_coco_eval import COCO as FasterCOCO
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.functional import to_tensor

from predet.evaluation.coco import (
    COCO_KEYS,
    LVIS_KEYS,
    evaluate_coco,
    evaluate_dataset,
    evaluate_lvis,
    write_results_json,
)
from predet.evaluation.inference import predictions_to_results, run_inference
from predet.evaluation.visualize import draw_detections, visualize

# pycocotools' mask.decode trips a NumPy 2 deprecation inside pycocotools itself (the fixtures
# decode masks); the code under test does not.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

W, H = 128, 112
CATEGORIES = [(3, "shirt", "f"), (7, "shoe", "c"), (11, "bag", "r")]


def rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def tri(x0, y0, x1, y1):
    return [x0, y1, (x0 + x1) / 2, y0, x1, y1]


# image id -> objects (category id, polygon); sizes span COCO's small / medium / large
OBJECTS = {
    1: [(3, rect(4, 4, 124, 108)), (7, rect(10, 10, 30, 28))],
    2: [(7, rect(20, 30, 70, 70)), (11, tri(80, 10, 120, 60)), (3, rect(5, 80, 25, 100))],
    3: [(11, rect(40, 40, 90, 100)), (11, rect(2, 2, 16, 14))],
}


def polygon_rle(polygon) -> dict:
    return mask_utils.merge(mask_utils.frPyObjects([polygon], H, W))


def annotations() -> list[dict]:
    anns = []
    for image_id, objects in OBJECTS.items():
        for category_id, polygon in objects:
            rle = polygon_rle(polygon)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id,
                         "segmentation": [polygon], "area": float(mask_utils.area(rle)),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    return anns


def coco_json() -> dict:
    anns = [dict(a, iscrowd=0) for a in annotations()]
    return {"images": [{"id": i, "file_name": f"img{i}.png", "height": H, "width": W}
                       for i in OBJECTS],
            "annotations": anns,
            "categories": [{"id": c, "name": n, "supercategory": "garment"}
                           for c, n, _ in CATEGORIES]}


def lvis_json() -> dict:
    anns = annotations()
    images = []
    for i in OBJECTS:
        present = {c for c, _ in OBJECTS[i]}
        images.append({"id": i, "coco_url": f"http://images.cocodataset.org/val2017/img{i}.png",
                       "height": H, "width": W, "license": 1, "flickr_url": "",
                       "date_captured": "2013-11-14 16:28:13",
                       "neg_category_ids": sorted(c for c, _, _ in CATEGORIES if c not in present),
                       "not_exhaustive_category_ids": []})
    categories = []
    for c, name, freq in CATEGORIES:
        cat_anns = [a for a in anns if a["category_id"] == c]
        categories.append({"id": c, "name": name, "synset": f"{name}.n.01", "synonyms": [name],
                           "def": f"a {name}", "frequency": freq,
                           "image_count": len({a["image_id"] for a in cat_anns}),
                           "instance_count": len(cat_anns)})
    return {"info": {}, "licenses": [], "images": images, "annotations": anns,
            "categories": categories}


def write_images(root) -> None:
    rng = np.random.default_rng(0)
    for i in OBJECTS:
        small = rng.uniform(0, 255, (7, 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((W, H), Image.BICUBIC).save(root / f"img{i}.png")


class TinyDetDataset(Dataset):
    """The detection dataset contract: (image CHW [0,1], target) plus coco|lvis, cat_ids,
    category_names."""

    def __init__(self, root, gt: dict, kind: str):
        self.root = root
        path = root / f"{kind}.json"
        path.write_text(json.dumps(gt))
        if kind == "coco":
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(path))
        else:
            self.lvis = FasterCOCO(str(path))
        self.cat_ids = [c["id"] for c in gt["categories"]]
        self.category_names = [c["name"] for c in gt["categories"]]
        self.images = sorted(gt["images"], key=lambda im: im["id"])
        self.anns = gt["annotations"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = self.images[index]
        name = info.get("file_name") or info["coco_url"].rsplit("/", 1)[-1]
        image = to_tensor(Image.open(self.root / name).convert("RGB"))
        anns = [a for a in self.anns if a["image_id"] == info["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        masks = np.stack([mask_utils.decode(polygon_rle(a["segmentation"][0])) for a in anns])
        target = {"boxes": boxes.float(),
                  "labels": torch.tensor([self.cat_ids.index(a["category_id"]) + 1 for a in anns]),
                  "masks": torch.from_numpy(masks).to(torch.uint8),
                  "image_id": info["id"]}
        return image, target


def collate(samples):
    images, targets = zip(*samples)
    return {"images": list(images), "targets": list(targets), "num_images": len(images)}


class LookupModel(nn.Module):
    """A 'detector' that finds each image in the dataset and answers with its ground truth,
    in torchvision's output format (masks as [M,1,H,W] probabilities)."""

    def __init__(self, dataset, masks: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.entries = [dataset[i] for i in range(len(dataset))]
        self.masks = masks

    def forward(self, images):
        assert not self.training, "evaluation must put the model in eval mode"
        outputs = []
        for image in images:
            target = next(t for im, t in self.entries
                          if im.shape == image.shape and torch.equal(im, image.cpu()))
            n = len(target["labels"])
            out = {"boxes": target["boxes"].clone(), "labels": target["labels"].clone(),
                   "scores": torch.linspace(1.0, 0.9, n)}
            if self.masks:
                out["masks"] = target["masks"][:, None].float()
            outputs.append(out)
        return outputs


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_images(root)
    return TinyDetDataset(root, coco_json(), "coco")


@pytest.fixture(scope="module")
def lvis_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvis")
    write_images(root)
    return TinyDetDataset(root, lvis_json(), "lvis")


def rle_str(rle: dict) -> dict:
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def perfect_results(anns) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 1.0, "segmentation": rle_str(polygon_rle(a["segmentation"][0]))}
            for a in anns]


def shifted(ann, dx, dy, score, category_id=None) -> dict:
    x, y, w, h = ann["bbox"]
    mask = mask_utils.decode(polygon_rle(ann["segmentation"][0]))
    mask = np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"image_id": ann["image_id"], "category_id": category_id or ann["category_id"],
            "bbox": [x + dx, y + dy, w, h], "score": score, "segmentation": rle_str(rle)}


def imperfect_results() -> list[dict]:
    a = annotations()
    return [
        shifted(a[0], 10, 6, 0.85),               # image 1 shirt: off by a few pixels
        # a[1] (image 1 small shoe) is missed
        shifted(a[2], 0, 0, 0.9),                 # image 2 shoe: exact
        shifted(a[3], 0, 0, 0.8, category_id=3),  # image 2 bag called a shirt
        shifted(a[4], 0, 0, 0.6),                 # image 2 small shirt: exact, low score
        shifted(a[5], 4, -3, 0.7),                # image 3 bag: slightly shifted
        shifted(a[6], 1, 0, 0.3),                 # image 3 small bag: one pixel off
        {"image_id": 3, "category_id": 7, "bbox": [95.0, 5.0, 20.0, 20.0], "score": 0.95},  # FP
    ]


def cocoeval_stats(coco, results, iou_type) -> list[float]:
    """COCOeval run by hand, the reference our wrapper must reproduce."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:6]]


def test_perfect_coco_predictions_score_one(coco_data, capsys):
    metrics = evaluate_coco(coco_data.coco, perfect_results(annotations()))
    assert set(metrics) == {f"{t}/{k}" for t in ("bbox", "segm") for k in COCO_KEYS}
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["segm/AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["bbox/AP50"] == pytest.approx(1.0, abs=1e-9)
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_imperfect_coco_predictions_match_cocoeval(coco_data):
    results = imperfect_results()
    untouched = copy.deepcopy(results)
    boxes = evaluate_coco(coco_data.coco, results, iou_types=("bbox",))
    assert results == untouched  # loadRes writes into its input; ours must not leak that
    expected = cocoeval_stats(coco_data.coco, results, "bbox")
    # the same numbers up to float summation order (faster-coco-eval sums in C++)
    assert [boxes[f"bbox/{k}"] for k in COCO_KEYS] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < boxes["bbox/AP"] < 1.0

    # Mask AP is scored on masks alone (box dropped, as Detectron2 does) so the size ranges
    # use the mask area; the same results without boxes give the reference numbers.
    mask_results = [{k: v for k, v in r.items() if k != "bbox"} for r in results
                    if "segmentation" in r]
    masks = evaluate_coco(coco_data.coco, mask_results, iou_types=("segm",))
    assert [masks[f"segm/{k}"] for k in COCO_KEYS] == pytest.approx(cocoeval_stats(
        coco_data.coco, mask_results, "segm"), abs=1e-12)
    assert 0.0 < masks["segm/AP"] < 1.0


def test_empty_results_score_zero(coco_data, lvis_data):
    assert evaluate_coco(coco_data.coco, []) == {
        f"{t}/{k}": 0.0 for t in ("bbox", "segm") for k in COCO_KEYS}
    assert evaluate_lvis(lvis_data.lvis, [], iou_types=("bbox",)) == {
        f"bbox/{k}": 0.0 for k in LVIS_KEYS}


def test_perfect_lvis_predictions_score_one_in_every_frequency_group(lvis_data):
    metrics = evaluate_lvis(lvis_data.lvis, perfect_results(annotations()))
    assert set(metrics) == {f"{t}/{k}" for t in ("bbox", "segm") for k in LVIS_KEYS}
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "APr", "APc", "APf"):
            assert metrics[f"{iou_type}/{key}"] == pytest.approx(1.0, abs=1e-9), (iou_type, key)


def test_lvis_keeps_only_300_detections_per_image(lvis_data):
    """Higher-scoring false shoes push image 2's true shoe out of the 300 LVIS allows."""
    def with_junk(count):
        true = [r for r in perfect_results(annotations())]
        for r in true:
            if r["image_id"] == 2 and r["category_id"] == 7:
                r["score"] = 0.1
        junk = [{"image_id": 2, "category_id": 7, "bbox": [100.0, 90.0, 4.0, 4.0], "score": 0.5}
                for _ in range(count)]
        return evaluate_lvis(lvis_data.lvis, true + junk, iou_types=("bbox",))["bbox/APc"]

    # "c" is the shoe alone: two shoes, image 1's found at score 1 (recall 0.5 at precision 1)
    half = 51 / 101  # COCO-style AP over 101 recall points, precision 1 up to recall 0.5
    assert with_junk(0) == pytest.approx(1.0)
    ranked_last = with_junk(300 - len(OBJECTS[2]))  # 300 in all: the true shoe still counts
    cut = with_junk(300 - len(OBJECTS[2]) + 1)  # 301: the lowest-scoring one, the true shoe, goes
    assert cut == pytest.approx(half)
    assert ranked_last > cut + 1e-3


def test_predictions_to_results_round_trip():
    probs = torch.zeros(2, 1, 20, 30)
    probs[0, 0, 2:8, 3:12] = 0.9
    probs[0, 0, 2:8, 12] = 0.4  # below the threshold: not part of the mask
    probs[1, 0, 10:19, 0:30] = 0.7
    output = {"boxes": torch.tensor([[3.0, 2.0, 12.0, 8.0], [0.0, 10.0, 30.0, 19.0]]),
              "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.8, 0.6]),
              "masks": probs}
    results = predictions_to_results([output], [torch.tensor(42)], cat_ids=[5, 9])
    json.dumps(results)  # plain types all the way down
    assert [r["category_id"] for r in results] == [9, 5]
    assert [r["image_id"] for r in results] == [42, 42]
    assert results[0]["bbox"] == pytest.approx([3.0, 2.0, 9.0, 6.0])
    assert results[1]["bbox"] == pytest.approx([0.0, 10.0, 30.0, 9.0])
    assert results[0]["score"] == pytest.approx(0.8)
    for result, prob in zip(results, probs):
        assert isinstance(result["segmentation"]["counts"], str)
        decoded = mask_utils.decode(result["segmentation"])
        assert np.array_equal(decoded, (prob[0] > 0.5).numpy().astype(np.uint8))

    boxes_only = predictions_to_results([output], [42], cat_ids=[5, 9], masks=False)
    assert all("segmentation" not in r for r in boxes_only)
    with pytest.raises(ValueError):
        predictions_to_results([output], [42], cat_ids=[5])  # label 2 has no category


def test_run_inference_through_a_dataloader(coco_data):
    model = LookupModel(coco_data).train()
    loader = DataLoader(coco_data, batch_size=2, shuffle=False, collate_fn=collate)
    results, stats = run_inference(model, loader, "cpu", progress=False)  # forward asserts eval
    assert model.training  # the caller's mode comes back (periodic eval mid-training)
    assert stats["images"] == len(coco_data)
    assert stats["seconds"] > 0 and stats["images_per_s"] > 0
    assert len(results) == sum(len(v) for v in OBJECTS.values())
    assert {r["category_id"] for r in results} == {c for c, _, _ in CATEGORIES}
    metrics = evaluate_coco(coco_data.coco, results)
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["segm/AP"] == pytest.approx(1.0, abs=1e-9)


def test_evaluate_dataset_coco_lvis_and_box_only(coco_data, lvis_data):
    metrics = evaluate_dataset(LookupModel(coco_data), coco_data, batch_size=2, progress=False)
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["segm/AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["images_per_s"] > 0

    boxes = evaluate_dataset(LookupModel(coco_data, masks=False), coco_data, progress=False)
    assert boxes["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    assert not any(k.startswith("segm/") for k in boxes)

    lvis = evaluate_dataset(LookupModel(lvis_data), lvis_data, batch_size=3, progress=False)
    for key in ("bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf", "segm/AP"):
        assert lvis[key] == pytest.approx(1.0, abs=1e-9), key


def test_evaluate_dataset_scores_only_the_images_it_ran(coco_data):
    """A subset of a json (a 1k-image split) is not charged for the images it leaves out."""
    subset = Subset(coco_data, [0, 2])
    metrics = evaluate_dataset(LookupModel(coco_data), subset, batch_size=1, progress=False)
    assert metrics["bbox/AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["segm/AP"] == pytest.approx(1.0, abs=1e-9)


def test_visualize_writes_pngs(coco_data, tmp_path):
    paths = visualize(LookupModel(coco_data), coco_data, num_images=2, out_dir=tmp_path / "vis")
    assert [p.name for p in paths] == ["vis_1.png", "vis_2.png"]
    for path in paths:
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.size == (W, H)
            assert image.mode == "RGB"


def test_draw_detections_marks_predictions_and_truth_apart(coco_data):
    image, target = coco_data[1]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0)}
    plain = np.asarray(draw_detections(image, empty, None, coco_data.category_names))
    truth = np.asarray(draw_detections(image, empty, target, coco_data.category_names))
    prediction = {"boxes": target["boxes"] + 3, "labels": target["labels"],
                  "scores": torch.tensor([0.9, 0.2, 0.8]),
                  "masks": target["masks"][:, None].float()}
    both = np.asarray(draw_detections(image, prediction, target, coco_data.category_names))
    assert np.array_equal(plain, (image * 255).round().byte().permute(1, 2, 0).numpy())
    assert not np.array_equal(truth, plain)
    assert not np.array_equal(both, truth)
    red = (both[..., 0] > 200) & (both[..., 1] < 60) & (both[..., 2] < 60)
    assert red.any()  # predictions drawn in their own colour


def test_write_results_json_is_sorted_and_atomic(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_results_json({"segm/AP": np.float64(0.25), "bbox/AP": 0.5, "images_per_s": 3.0}, path)
    text = path.read_text()
    assert json.loads(text) == {"segm/AP": 0.25, "bbox/AP": 0.5, "images_per_s": 3.0}
    assert text.index("bbox/AP") < text.index("images_per_s") < text.index("segm/AP")
    write_results_json({"bbox/AP": 0.75}, path)
    assert json.loads(path.read_text()) == {"bbox/AP": 0.75}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_per_category_ap_is_cocoeval_on_that_category_alone(coco_data):
    results = [r for r in imperfect_results() if "segmentation" in r] + [imperfect_results()[-1]]
    per_category = {}
    evaluate_coco(coco_data.coco, results, iou_types=("bbox",), per_category=per_category)
    seen = []
    for cat_id, _, _ in CATEGORIES:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco_data.coco, coco_data.coco.loadRes(copy.deepcopy(results)), "bbox")
            evaluator.params.catIds = [cat_id]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert per_category["bbox"][cat_id] == pytest.approx(evaluator.stats[0], abs=1e-12), cat_id
        seen.append(per_category["bbox"][cat_id])
    assert len(set(seen)) > 1  # the categories really differ in this fixture


def test_evaluation_has_per_category_rows_and_the_results_file(coco_data, lvis_data, tmp_path):
    from predet.evaluation.coco import (
        evaluate_dataset_full,
        format_per_category,
        write_coco_results,
    )

    evaluation = evaluate_dataset_full(LookupModel(coco_data), coco_data, progress=False)
    assert [r["name"] for r in evaluation.per_category] == ["shirt", "shoe", "bag"]
    assert [r["category_id"] for r in evaluation.per_category] == [3, 7, 11]
    assert all(r["bbox/AP"] == pytest.approx(1.0) and r["segm/AP"] == pytest.approx(1.0)
               for r in evaluation.per_category)
    assert "| 7 | shoe | 100.0 | 100.0 |" in format_per_category(evaluation.per_category)
    path = write_coco_results(evaluation.results, tmp_path / "coco_instances_results.json")
    written = json.loads(path.read_text())
    assert len(written) == sum(len(v) for v in OBJECTS.values())
    assert set(written[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert isinstance(written[0]["segmentation"]["counts"], str) and len(written[0]["bbox"]) == 4
    # the file is what the COCO tools read: scoring it again gives the same AP
    assert evaluate_coco(coco_data.coco, written)["segm/AP"] == pytest.approx(1.0)
    lvis = evaluate_dataset_full(LookupModel(lvis_data), lvis_data, progress=False)
    assert [r["bbox/AP"] for r in lvis.per_category] == pytest.approx([1.0, 1.0, 1.0])


# LVISEval of lvis 0.5.3 (the reference implementation) on imperfect_results(), bbox and segm
LVIS_REFERENCE = {
    "bbox/AP": 0.4174917491749175, "bbox/AP50": 0.5836083608360837, "bbox/AP75": 0.5836083608360837,
    "bbox/APs": 0.4679867986798679, "bbox/APm": 0.7999999999999999, "bbox/APl": 0.5999999999999999,
    "bbox/APr": 0.4316831683168317, "bbox/APc": 0.2524752475247525, "bbox/APf": 0.5683168316831682,
    "segm/AP": 0.5016501650165016, "segm/AP50": 0.6677667766776678, "segm/AP75": 0.6677667766776678,
    "segm/APs": 0.30132013201320135, "segm/APm": 0.7999999999999999, "segm/APl": 0.5999999999999999,
    "segm/APr": 0.4316831683168317, "segm/APc": 0.5049504950495048, "segm/APf": 0.5683168316831682,
}


def test_imperfect_lvis_predictions_match_lviseval(lvis_data):
    results = imperfect_results()
    boxes = evaluate_lvis(lvis_data.lvis, results, iou_types=("bbox",))
    masks = evaluate_lvis(lvis_data.lvis, [{k: v for k, v in r.items() if k != "bbox"} for r in results
                                           if "segmentation" in r], iou_types=("segm",))
    for key, value in {**boxes, **masks}.items():
        assert value == pytest.approx(LVIS_REFERENCE[key], abs=1e-12), key
