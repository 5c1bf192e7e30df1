"""One clean error per user mistake (issue 10, item 5): every case through the real CLI.

Each case: exit code 2, one line on stderr naming the cause (and the fix), no traceback, and no
output folder left behind. A bug still raises (the console script prints its traceback, exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    CPU_FINETUNE_CONFIG,
    CPU_PRETRAIN_CONFIG,
    tiny_finetune_overrides,
    tiny_pretrain_overrides,
)

from predet.cli import main as cli_main


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def _pretrain(data, run, *extra):
    return ["pretrain", "--config", str(CPU_PRETRAIN_CONFIG),
            *tiny_pretrain_overrides(data / "weak", run, 2), *extra]


def _finetune(data, run, *extra):
    return ["finetune", "--config", str(CPU_FINETUNE_CONFIG),
            *tiny_finetune_overrides(data, run, "scratch"), *extra]


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _non_utf8_labels(tmp: Path, data: Path) -> Path:
    good = (data / "weak" / "labels.jsonl").read_bytes().splitlines()[0]
    return _write(tmp / "latin1" / "labels.jsonl", good + b"\n" + b'{"image": "caf\xe9.png", "labels": ["Bag"]}\n')


def _pickled(tmp: Path) -> Path:
    path = tmp / "evil.pth"
    torch.save({"model": {}, "x": _Payload()}, path)
    return path


def _no_kind(tmp: Path) -> Path:
    path = tmp / "weights.pth"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    return path


def _truncated(tmp: Path) -> Path:
    path = tmp / "cut.pth"
    torch.save({"model": {"w": torch.ones(1000)}, "extra_state": {"kind": "predet_finetune"}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _damaged_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp / "w.safetensors"
    save_file({"backbone.body.conv1.weight": torch.ones(8, 3, 7, 7)}, path)
    path.write_bytes(path.read_bytes()[:40])
    return path


def _lvis_without_frequency(tmp: Path, data: Path) -> Path:
    coco = json.loads((data / "det" / "annotations" / "train.json").read_text())
    for image in coco["images"]:
        image.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    for cat in coco["categories"]:
        cat.pop("frequency", None)
    return _write(tmp / "lvis" / "lvis.json", json.dumps(coco).encode())


def _shards_out(tmp: Path, data: Path) -> Path:
    out = tmp / "shards"
    _write(out / "shard-000000.tar", b"")
    return out


# (name, argv builder(tmp, data, run) -> list, expected fragments, output folder that must not remain)
CASES = [
    ("zero iterations", lambda t, d, r: _pretrain(d, r, "solver.max_iters=0"), ["solver.max_iters=0", "must be > 0"]),
    ("negative iterations", lambda t, d, r: _finetune(d, r, "solver.max_iters=-3"), ["solver.max_iters=-3"]),
    ("zero batch size", lambda t, d, r: _pretrain(d, r, "train.batch_size=0"), ["train.batch_size=0"]),
    ("negative batch size", lambda t, d, r: _finetune(d, r, "train.batch_size=-2"), ["train.batch_size=-2"]),
    ("empty data.train", lambda t, d, r: _pretrain(d, r, "data.train="), ["data.train is empty"]),
    ("missing data.train", lambda t, d, r: _pretrain(d, r, f"data.train={t}/nope.jsonl"),
     ["labels file not found", "nope.jsonl"]),
    ("missing detection json", lambda t, d, r: _finetune(d, r, f"data.train={t}/nope.json"),
     ["annotation file not found", "nope.json"]),
    ("missing data.vocab", lambda t, d, r: _pretrain(d, r, f"data.vocab={t}/vocab.json"),
     ["vocabulary file not found"]),
    ("bad data.vocab", lambda t, d, r: _pretrain(d, r, f"data.vocab={_write(t / 'v.json', b'{}')}"),
     ["v.json", "expected a JSON list"]),
    ("unknown backbone", lambda t, d, r: _pretrain(d, r, "model.backbone=resnet7"),
     ["model.backbone='resnet7': must be one of", "resnet18"]),
    ("unknown schedule", lambda t, d, r: _finetune(d, r, "schedule=7x"), ["schedule='7x': must be", "1x, 2x"]),
    ("unknown arch", lambda t, d, r: _finetune(d, r, "model.arch=yolo"), ["model.arch='yolo': must be one of"]),
    # issue 21: each value checked when the command starts, before any work
    ("unknown amp", lambda t, d, r: _pretrain(d, r, "solver.amp=fp32"), ["solver.amp='fp32': must be one of none, bf16, fp16"]),
    ("unknown data kind", lambda t, d, r: _finetune(d, r, "data.kind=xyz"), ["data.kind='xyz': must be one of coco, lvis"]),
    ("unknown norm (pretrain)", lambda t, d, r: _pretrain(d, r, "model.norm=foo"), ["model.norm='foo'", "frozen_bn"]),
    ("unknown norm (finetune)", lambda t, d, r: _finetune(d, r, "model.norm=foo"), ["model.norm='foo'", "gn"]),
    ("no anchor sizes", lambda t, d, r: _pretrain(d, r, "model.anchor_sizes=[]"), ["model.anchor_sizes=[]", "5 values"]),
    ("four anchor sizes", lambda t, d, r: _finetune(d, r, "model.anchor_sizes=[8,16,32,64]"),
     ["model.anchor_sizes=[8, 16, 32, 64]", "5 values"]),
    ("zero queries", lambda t, d, r: _pretrain(d, r, "data.views.num_queries=0"), ["data.views.num_queries=0", "> 0"]),
    ("views too small", lambda t, d, r: _pretrain(d, r, "data.views.size=7"), ["data.views.size=7", ">= 32"]),
    ("negative gamma", lambda t, d, r: _finetune(d, r, "solver.gamma=-0.5"), ["solver.gamma=-0.5", "> 0"]),
    ("nan lr", lambda t, d, r: _pretrain(d, r, "solver.lr=nan"), ["solver.lr=nan", ">= 0"]),
    ("negative lr", lambda t, d, r: _finetune(d, r, "solver.lr=-0.1"), ["solver.lr=-0.1", ">= 0"]),
    ("flip probability above 1", lambda t, d, r: _finetune(d, r, "data.flip_p=1.5"), ["data.flip_p=1.5", "[0, 1]"]),
    ("zero eval batch", lambda t, d, r: _finetune(d, r, "eval.batch_size=0"), ["eval.batch_size=0", "> 0"]),
    ("bad device name", lambda t, d, r: _pretrain(d, r, "train.device=gpu"), ["train.device='gpu'", "cuda:N"]),
    ("lvis without frequencies", lambda t, d, r: _finetune(d, r, "data.kind=lvis", f"data.train={_lvis_without_frequency(t, d)}"),
     ["lvis.json: categories[0]", 'field "frequency"', "'r', 'c', 'f'"]),
    ("missing init", lambda t, d, r: _finetune(d, r, f"init={t}/gone.pth"), ["gone.pth", "not found"]),
    ("subset larger than data", lambda t, d, r: _finetune(d, r, "data.subset=1000"),
     ["data.subset=1000", "has 48 images"]),
    ("non-UTF-8 labels", lambda t, d, r: _pretrain(d, r, f"data.train={_non_utf8_labels(t, d)}", "data.vocab="),
     ["labels.jsonl:2", "not UTF-8"]),
    ("refused pickle (eval)", lambda t, d, r: ["eval", "--checkpoint", str(_pickled(t)), "--data", "x.json",
                                               "--out", str(r)],
     ["refusing to load", "evil.pth", "Unsupported global: GLOBAL print was not an allowed global by default",
      "source you trust"]),
    ("damaged safetensors (init)", lambda t, d, r: _finetune(d, r, f"init={_damaged_safetensors(t)}"),
     ["w.safetensors", "truncated or damaged safetensors"]),
    ("damaged safetensors (export)", lambda t, d, r: ["export", "--checkpoint", str(_damaged_safetensors(t)), "--out", str(r)],
     ["w.safetensors", "truncated or damaged"]),
    ("missing checkpoint (eval)", lambda t, d, r: ["eval", "--checkpoint", f"{t}/no.pth", "--data", "x.json",
                                                   "--out", str(r)], ["checkpoint not found", "no.pth"]),
    ("truncated checkpoint (eval)", lambda t, d, r: ["eval", "--checkpoint", str(_truncated(t)), "--data",
                                                     "x.json", "--out", str(r)], ["cut.pth", "truncated or damaged"]),
    ("wrong-kind checkpoint (eval)", lambda t, d, r: ["eval", "--checkpoint", str(_no_kind(t)), "--data", "x.json",
                                                      "--out", str(r)], ["not a predet finetune checkpoint"]),
    ("missing checkpoint (export)", lambda t, d, r: ["export", "--checkpoint", f"{t}/no.pth", "--out", str(r)],
     ["checkpoint not found"]),
    ("wrong-kind checkpoint (export)", lambda t, d, r: ["export", "--checkpoint", str(_no_kind(t)), "--out", str(r)],
     ["weights.pth", "not a predet checkpoint"]),
    ("existing shard folder", lambda t, d, r: ["data", "shards", "--labels", str(d / "weak" / "labels.jsonl"),
                                               "--out", str(_shards_out(t, d))], ["already holds shards"]),
]
# A folder no process can write, root included (CI runs as root, which ignores permission bits).
UNWRITABLE = "/proc/predet-unwritable/out"
CASES += [
    (f"unwritable output ({verb})", argv, [UNWRITABLE, "cannot write in /proc"]) for verb, argv in [
        ("pretrain", lambda t, d, r: _pretrain(d, r, f"train.run_dir={UNWRITABLE}")),
        ("finetune", lambda t, d, r: _finetune(d, r, f"train.run_dir={UNWRITABLE}")),
        ("eval", lambda t, d, r: ["eval", "--checkpoint", "c.pth", "--data", "d.json", "--out", UNWRITABLE]),
        ("predict", lambda t, d, r: ["predict", "--checkpoint", "c.pth", "--images", str(t), "--out", UNWRITABLE]),
        ("export", lambda t, d, r: ["export", "--checkpoint", "c.pth", "--out", UNWRITABLE]),
        ("sweep", lambda t, d, r: ["sweep", "--config", str(CPU_FINETUNE_CONFIG), "--grid", "lr=0.1", "--out", UNWRITABLE]),
        ("report", lambda t, d, r: ["report", str(t), "--out", UNWRITABLE]),
        ("data", lambda t, d, r: ["data", "fashiondet", "--out", UNWRITABLE, "--size", "tiny"]),
        ("shards", lambda t, d, r: ["data", "shards", "--labels", str(d / "weak" / "labels.jsonl"), "--out", UNWRITABLE]),
        ("demo", lambda t, d, r: ["demo", "--out", UNWRITABLE]),
    ]
]
if not torch.cuda.is_available():
    CASES.append(("cuda without CUDA", lambda t, d, r: _pretrain(d, r, "train.device=cuda"),
                  ["train.device='cuda'", "CUDA is not available"]))


@pytest.mark.parametrize("name,argv,fragments", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line_exit_2_and_leaves_no_output(name, argv, fragments, fashiondet_tiny,
                                                              tmp_path, capsys):
    run = tmp_path / "out"
    args = [str(a) for a in argv(tmp_path, fashiondet_tiny, run)]
    capsys.readouterr()
    assert cli_main(args) == 2, name
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if ": error: " in l]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"predet {args[0]}: error: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not run.exists(), f"{name}: left {sorted(p.name for p in run.iterdir())}"


ARGUMENT_CASES = [
    (["eval", "--checkpoint", "c.pth", "--data", "d.json", "--batch-size", "0"], "--batch-size: 0: must be a positive integer"),
    (["predict", "--checkpoint", "c.pth", "--images", "i", "--out", "o", "--score-thresh", "nan"],
     "--score-thresh: nan: must be a score in [0, 1]"),
    (["predict", "--checkpoint", "c.pth", "--images", "i", "--out", "o", "--num-workers", "-1"], "--num-workers: -1"),
    (["sweep", "--seeds", "0"], "--seeds: 0: must be a positive integer"),
]


@pytest.mark.parametrize("argv,fragment", ARGUMENT_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in ARGUMENT_CASES])
def test_a_bad_argument_is_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"predet {argv[0]}: error: argument ") and fragment in err[0], err


def test_a_bug_keeps_its_traceback(monkeypatch, fashiondet_tiny, tmp_path):
    import predet.pretrain

    def broken(cfg):
        raise ZeroDivisionError("a bug, not the user's mistake")

    monkeypatch.setattr(predet.pretrain, "pretrain", broken)
    with pytest.raises(ZeroDivisionError):  # the console script prints it and exits 1
        cli_main(_pretrain(fashiondet_tiny, tmp_path / "run"))


class _RaisesInWorker(torch.utils.data.Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise self.error


@pytest.mark.parametrize("error", [
    __import__("predet.config", fromlist=["ConfigError"]).ConfigError("x.json: images[3] (id 7): field \"width\": 5x5, the record says 6x6"),
    __import__("predet.errors", fromlist=["DataError"]).DataError("too many unreadable images;\nsee skipped.jsonl"),
])
def test_an_error_in_a_loader_worker_is_the_same_one_line(error):
    # torch re-raises a worker's exception with the worker's traceback as its message
    from predet.cli import user_error_line

    loader = torch.utils.data.DataLoader(_RaisesInWorker(error), num_workers=1)
    with pytest.raises(type(error)) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)
    assert user_error_line(info.value) == user_error_line(error)
