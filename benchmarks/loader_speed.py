"""The two-view loader at 800 px: images/s of one loader core against its floor.

A loader worker has one core and one thread. Per source image it decodes a JPEG and renders two
views; the floor is that and nothing else (decode + two resized crops as uint8 tensors). The
pipeline adds the crop and query sampling, flips, the colour-change draws and collation; the
colour changes themselves run on the device (``predet.data.views.colour_views``), so they are timed
separately, on this CPU, as the cost they would have in a worker. Both are timed alternately in
the same process, so machine noise cancels in the ratio (goal >= 0.8).

The GPU step rate below is an estimate, not a measurement on a GPU: the FLOPs of one R50-FPN
PreDet step (``benchmarks/step_cost.py``) at an assumed sustained throughput. Prints one JSON
object. Usage: ``python benchmarks/loader_speed.py [--images 24] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from predet.config.pretrain import ViewConfig
from predet.data.shards import decode_shard_sample
from predet.data.views import TwoViewTransform, collate_two_view, colour_views
from predet.data.weak import Vocabulary

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def source_jpegs(n: int, width: int = 1024, height: int = 768) -> list[bytes]:
    """Photographs bundled with scikit-image at a typical web-photo size, JPEG quality 90."""
    out = []
    for i in range(n):
        photo = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        photo = photo.resize((width, height), Image.BICUBIC).rotate(7 * i, expand=False)
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def floor_image(data: bytes, size: int) -> None:
    """Decode, then two resized crops as uint8 tensors: what any two-view loader must do."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        image = im.convert("RGB")
    w, h = image.size
    for box in ((0, 0, 0.8 * w, 0.9 * h), (0.15 * w, 0.1 * h, w, h)):
        torch.from_numpy(np.array(image.resize((size, size), Image.BILINEAR, box=box))).permute(2, 0, 1)


def pipeline_batch(raws: list[dict], vocab, transform, start: int) -> dict:
    """What a worker does for one batch: shard samples decoded into two views, then collated."""
    return collate_two_view([decode_shard_sample(raw, vocab, transform, start + i) for i, raw in enumerate(raws)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--gpu-tflops", type=float, default=200.0,
                        help="assumed sustained bf16 throughput of one GPU for the step-rate estimate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker runs one thread
    jpegs = source_jpegs(args.images)
    vocab = Vocabulary(["a", "b", "c"])
    raws = [{"__url__": "bench.tar", "__key__": f"{i:06d}", "jpg": data, "json": b'{"labels": ["a"]}'}
            for i, data in enumerate(jpegs)]
    cfg = ViewConfig(size=args.size, num_queries=16, min_query_px=16)  # the GPU configs' views
    transform = TwoViewTransform(cfg)
    floor_s, pipe_s, colour_s = [], [], []
    pipeline_batch(raws[:2], vocab, transform, 0)  # warm up
    for r in range(args.rounds):
        t = time.perf_counter()
        for data in jpegs:
            floor_image(data, args.size)
        floor_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        batches = [pipeline_batch(raws[i:i + 2], vocab, transform, 1000 * r + i) for i in range(0, len(raws), 2)]
        pipe_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for b in batches:
            colour_views(b["view1"], b["colour1"]), colour_views(b["view2"], b["colour2"])
        colour_s.append(time.perf_counter() - t)
    n = len(jpegs)
    floor_rate, pipe_rate = n / statistics.median(floor_s), n / statistics.median(pipe_s)
    colour_rate = n / statistics.median(colour_s)
    batch = batches[0]
    view_bytes = sum(batch[k].element_size() * batch[k].nelement() for k in ("view1", "view2")) / len(raws[:2])
    flops = _step_flops()
    step_images_per_s = args.gpu_tflops * 1e12 / flops["predet_per_image"] if flops else None
    result = {
        "command": "python benchmarks/loader_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "view_size": args.size, "source_size": [1024, 768], "images": n,
        "rounds": args.rounds, "threads": 1,
        "floor_images_per_s_per_core": round(floor_rate, 2),
        "pipeline_images_per_s_per_core": round(pipe_rate, 2),
        "pipeline_over_floor": round(pipe_rate / floor_rate, 3),
        "goal_pipeline_over_floor": 0.8,
        "colour_jitter_on_this_cpu_images_per_s": round(colour_rate, 2),
        "pipeline_with_jitter_in_the_worker_over_floor": round(1 / (1 / pipe_rate + 1 / colour_rate) / floor_rate, 3),
        "bytes_per_image_to_the_main_process": int(view_bytes),
        "bytes_per_image_if_float32": int(view_bytes * 4),
    }
    if step_images_per_s:
        result.update({
            "assumed_gpu_tflops": args.gpu_tflops,
            "predet_r50_800px_step_gflops_per_image": round(flops["predet_per_image"] / 1e9, 1),
            "estimated_gpu_images_per_s": round(step_images_per_s, 1),
            "loader_cores_per_gpu": round(step_images_per_s / pipe_rate, 1),
            "loader_cores_per_gpu_if_jitter_in_the_worker": round(
                step_images_per_s * (1 / pipe_rate + 1 / colour_rate), 1),
        })
    print(json.dumps(result, indent=1))
    return result


def _step_flops() -> dict | None:
    """The PreDet R50-FPN 800 px step's FLOPs per image, from step_cost.py's committed result."""
    path = Path(__file__).parent / "results" / "step_cost.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {"predet_per_image": data["predet"]["total_flops"] / data["images"]}


if __name__ == "__main__":
    main()
