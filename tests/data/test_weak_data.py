"""Weak-label data: labels files, bad images, vocabulary, deterministic sampling, shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from predet.data.build import build_weak_dataset
from predet.data.samplers import DeterministicBatchSampler
from predet.data.shards import weak_webdataset, write_webdataset_shards
from predet.data.weak import (
    LabelFileError,
    Vocabulary,
    WeakLabelFolder,
    collate_weak,
    read_labels_jsonl,
)

NAMES = ["Bag", "Coat", "Sneaker"]
N_GOOD = 7


def _png_bytes(seed: int, size=(20, 16)) -> bytes:
    """Random noise compresses badly, so a half-written file is truly truncated."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def make_folder(root, bad=True):
    """N_GOOD images in two formats/subfolders, plus corrupt, truncated and missing ones."""
    (root / "imgs" / "sub").mkdir(parents=True)
    entries = []
    for i in range(N_GOOD):
        rel = f"imgs/sub/g{i}.png" if i % 2 else f"imgs/g{i}.jpg"
        if rel.endswith(".png"):
            (root / rel).write_bytes(_png_bytes(i))
        else:
            Image.new("RGB", (18, 14), (i * 30, 10, 200)).save(root / rel, "JPEG")
        entries.append((rel, [NAMES[i % 3]] + (["Coat"] if i % 4 == 0 else [])))
    if bad:
        (root / "imgs/corrupt.png").write_bytes(os.urandom(300))
        (root / "imgs/truncated.png").write_bytes(_png_bytes(99, (40, 40))[:700])
        entries += [("imgs/corrupt.png", ["Bag"]), ("imgs/truncated.png", ["Coat"]), ("imgs/missing.png", [])]
    lines = [json.dumps({"image": rel, "labels": labels}) for rel, labels in entries]
    return _write_lines(root / "labels.jsonl", lines), entries


def seeded_transform(image, sample_seed):
    """Module-level so DataLoader workers can pickle it."""
    return {"image": torch.from_numpy(np.asarray(image).copy()), "seed": sample_seed}


# ---------------------------------------------------------------- labels file


def test_read_good_labels_file(tmp_path):
    (tmp_path / "a").mkdir()
    path = _write_lines(
        tmp_path / "labels.jsonl",
        ['{"image": "a/x.png", "labels": ["Sneaker", "Bag"]}', "", '{"image": "/abs/y.jpg", "labels": []}'],
    )
    records = read_labels_jsonl(path)
    assert [r.image for r in records] == [str(tmp_path / "a" / "x.png"), "/abs/y.jpg"]
    assert [r.labels for r in records] == [["Sneaker", "Bag"], []]
    assert [r.line for r in records] == [1, 3]
    other = read_labels_jsonl(path, image_root=tmp_path / "elsewhere")
    assert other[0].image == str(tmp_path / "elsewhere" / "a" / "x.png")


@pytest.mark.parametrize(
    "line, field, fragment",
    [
        ('{"image": "x.png", "labels": ["a"]', None, "invalid JSON"),
        ('["x.png", ["a"]]', None, "expected a JSON object"),
        ('{"labels": ["a"]}', "image", "missing"),
        ('{"image": "", "labels": ["a"]}', "image", "non-empty"),
        ('{"image": 5, "labels": ["a"]}', "image", "got 5"),
        ('{"image": "x.png"}', "labels", "missing"),
        ('{"image": "x.png", "labels": 3}', "labels", "expected a list of strings, got 3"),
        ('{"image": "x.png", "labels": ["a", 2]}', "labels", "expected a list of strings"),
        ('{"image": "x.png", "labels": "a"}', "labels", "expected a list of strings"),
    ],
)
def test_malformed_line_names_file_line_field(tmp_path, line, field, fragment):
    path = _write_lines(tmp_path / "labels.jsonl", ['{"image": "ok.png", "labels": ["a"]}', line])
    with pytest.raises(LabelFileError) as info:
        read_labels_jsonl(path)
    message = str(info.value)
    assert "labels.jsonl:2:" in message
    assert str(path) in message
    if field:
        assert f'field "{field}"' in message
    assert fragment in message


def test_unknown_label_with_fixed_vocab(tmp_path):
    path = _write_lines(
        tmp_path / "labels.jsonl",
        ['{"image": "a.png", "labels": ["Bag"]}', '{"image": "b.png", "labels": ["Bag", "Hat"]}'],
    )
    with pytest.raises(LabelFileError, match=r'labels\.jsonl:2: field "labels": unknown label .Hat.'):
        WeakLabelFolder(path, vocab=Vocabulary.from_names(NAMES))


def test_empty_labels_file_is_an_error(tmp_path):
    with pytest.raises(LabelFileError, match="no records"):
        read_labels_jsonl(_write_lines(tmp_path / "labels.jsonl", ["", "  "]))


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_build_encode_and_checkpoint_round_trip(tmp_path):
    labels_file, _ = make_folder(tmp_path, bad=False)
    vocab = Vocabulary.build(read_labels_jsonl(labels_file))
    assert vocab.names == tuple(NAMES) and len(vocab) == 3
    assert vocab.index("Coat") == 1
    assert vocab.encode(["Sneaker", "Bag", "Bag"]).tolist() == [1.0, 0.0, 1.0]
    assert vocab.encode([]).dtype == torch.float32
    with pytest.raises(KeyError, match="Hat"):
        vocab.encode(["Hat"])
    torch.save({"vocab": vocab.to_list()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert Vocabulary.from_list(loaded["vocab"]) == vocab
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.from_names(["a", "a"])


# ---------------------------------------------------------------- folder dataset and skipping


def test_folder_items_and_skipped_images(tmp_path):
    labels_file, entries = make_folder(tmp_path)
    ds = WeakLabelFolder(labels_file)
    assert len(ds) == N_GOOD + 3 and ds.vocab.names == tuple(NAMES)
    first = ds[0]
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (3, 14, 18)
    assert first["labels"].tolist() == [1.0, 1.0, 0.0]  # entry 0: Bag + Coat
    reasons = {}
    for i in range(N_GOOD, N_GOOD + 3):
        out = ds[i]
        assert out["skipped"] is True and set(out) == {"skipped", "path", "reason"}
        reasons[os.path.basename(out["path"])] = out["reason"]
    assert "truncated" in reasons["truncated.png"]
    assert reasons["missing.png"] == "not found"  # not a decoding error
    assert reasons["corrupt.png"]


def test_transform_gets_the_sample_seed(tmp_path):
    labels_file, _ = make_folder(tmp_path, bad=False)
    ds = WeakLabelFolder(labels_file, transform=seeded_transform)
    assert ds[(1, 12345)]["seed"] == 12345
    assert ds[1]["seed"] == 1
    assert ds[(1, 12345)]["image"].shape == (16, 20, 3)


def test_dataloader_two_workers_counts_every_skip(tmp_path):
    labels_file, entries = make_folder(tmp_path)
    ds = WeakLabelFolder(labels_file)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_weak)
    skipped, arrived = [], []
    for batch in loader:
        skipped += batch["skipped"]  # what the trainer's skip tracker reads from every batch
        if batch["samples"]:
            assert batch["labels"].shape == (len(batch["samples"]), 3)
        arrived += [s["path"] for s in batch["samples"]]
    assert len(skipped) == 3 and any(str(p).endswith("missing.png") for p, _ in skipped)
    assert sorted(arrived) == sorted(str(tmp_path / rel) for rel, _ in entries[:N_GOOD])


def test_collate_all_skipped():
    batch = collate_weak([{"skipped": True, "path": "p", "reason": "r"}])
    assert batch["samples"] == [] and batch["labels"].shape[0] == 0 and batch["skipped"] == [("p", "r")]


# ---------------------------------------------------------------- deterministic sampler


def test_sampler_drives_a_dataloader(tmp_path):
    labels_file, _ = make_folder(tmp_path, bad=False)
    ds = WeakLabelFolder(labels_file, transform=seeded_transform)
    sampler = DeterministicBatchSampler(len(ds), 2, seed=0, start_iter=3)
    loader = iter(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_weak))
    batch = next(loader)
    expected = sampler.batch(3)
    assert [s["seed"] for s in batch["samples"]] == [seed for _, seed in expected]
    assert [s["path"] for s in batch["samples"]] == [ds.records[i].image for i, _ in expected]


# ---------------------------------------------------------------- shards


def _multiset(samples, vocab, root=None):
    items = []
    for s in samples:
        path = os.path.relpath(s["path"], root) if root else s["path"]
        items.append((path, tuple(n for n, v in zip(vocab.names, s["labels"].tolist()) if v)))
    return Counter(items)


def test_shards_round_trip_through_two_workers(tmp_path):
    labels_file, _ = make_folder(tmp_path / "folder")
    with pytest.warns(UserWarning, match="1 image"):  # the missing file cannot be copied
        shards = write_webdataset_shards(labels_file, tmp_path / "shards", shard_size=3)
    assert len(shards) == 3 and all(os.path.isfile(p) for p in shards)
    assert json.loads((tmp_path / "shards" / "vocab.json").read_text()) == NAMES

    folder = WeakLabelFolder(labels_file)
    expected = _multiset([s for s in (folder[i] for i in range(len(folder))) if not s.get("skipped")],
                         folder.vocab, tmp_path / "folder")

    ds, vocab = build_weak_dataset(str(tmp_path / "shards"), seed=0)
    assert vocab == folder.vocab
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_weak)
    skipped, got = [], []
    for batch in loader:
        skipped += batch["skipped"]
        got += batch["samples"]
    assert _multiset(got, vocab) == expected
    assert len(skipped) == 2  # corrupt + truncated travel inside shards; missing was never written
    assert {os.path.basename(p) for p, _ in skipped} == {"corrupt.png", "truncated.png"}


def test_shard_stream_is_deterministic_and_accepts_patterns(tmp_path):
    labels_file, _ = make_folder(tmp_path / "folder", bad=False)
    write_webdataset_shards(labels_file, tmp_path / "shards", shard_size=2)
    pattern = str(tmp_path / "shards" / "shard-{000000..000003}.tar")
    vocab = Vocabulary.from_names(NAMES)

    def run(seed):
        stream = weak_webdataset(pattern, vocab, seeded_transform, seed=seed, shuffle=4)
        return [(s["path"], s["seed"]) for s in stream]

    assert run(1) == run(1)
    assert len(run(1)) == N_GOOD
    assert run(1) != run(2)
    repeating, _ = build_weak_dataset(pattern, vocab, repeat=True)
    it = iter(repeating)
    assert len([next(it) for _ in range(3 * N_GOOD)]) == 3 * N_GOOD


def test_shards_are_split_between_ranks(tmp_path, monkeypatch):
    labels_file, _ = make_folder(tmp_path / "folder", bad=False)
    shards = write_webdataset_shards(labels_file, tmp_path / "shards", shard_size=2)
    ds, _ = build_weak_dataset(shards)
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append({s["path"] for s in ds})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == N_GOOD
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(ValueError, match="4 shard"):
        next(iter(ds))


def test_shards_with_class_indices_and_unknown_names(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, ext, data in [("a", "png", _png_bytes(1)), ("a", "cls", b"0,2"),
                               ("b", "png", _png_bytes(2)), ("b", "json", b'{"labels": ["Hat"]}')]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    vocab = Vocabulary.from_names(NAMES)
    it = iter(weak_webdataset([str(shard)], vocab, shuffle=0))
    first = next(it)
    assert first["labels"].tolist() == [1.0, 0.0, 1.0] and first["path"].endswith("s.tar#a")
    with pytest.raises(LabelFileError, match=r's\.tar: sample b: field "labels": unknown label .Hat.'):
        next(it)


def test_shards_without_vocabulary_are_refused(tmp_path):
    labels_file, _ = make_folder(tmp_path / "folder", bad=False)
    shards = write_webdataset_shards(labels_file, tmp_path / "shards", shard_size=4)
    os.remove(tmp_path / "shards" / "vocab.json")
    with pytest.raises(ValueError, match="vocab.json"):
        build_weak_dataset(shards)
    ds, vocab = build_weak_dataset(shards, vocab=Vocabulary.from_names(NAMES))
    assert len(list(ds)) == N_GOOD
    with pytest.raises(FileExistsError):
        write_webdataset_shards(labels_file, tmp_path / "shards")
    with pytest.raises(FileNotFoundError):
        build_weak_dataset(str(tmp_path / "nope-{000..001}.tar"), vocab=vocab)


def test_build_from_labels_file(tmp_path):
    labels_file, _ = make_folder(tmp_path, bad=False)
    ds, vocab = build_weak_dataset(str(labels_file))
    assert isinstance(ds, WeakLabelFolder) and len(ds) == N_GOOD and vocab.names == tuple(NAMES)
