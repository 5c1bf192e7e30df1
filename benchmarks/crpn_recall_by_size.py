"""Where the CRPN's held-out recall is lost: recall@0.5 of the top box per query, split by the
query's side in view pixels, beside the share of queries that any anchor can reach (IoU >= 0.5).

A query no anchor reaches can only be found through regression, so the reachable share is the
ceiling the anchor set puts on the recall. The model, anchors and views are the checkpoint's
own (its saved config), so a run with other anchor sizes is measured with its anchors; ``--config``
only stands in for a checkpoint saved without one. Prints one JSON object. Usage:
    python benchmarks/crpn_recall_by_size.py CHECKPOINT [--val HELDOUT.jsonl] [--images 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import box_iou

from predet.checkpoint.io import load_checkpoint
from predet.config import from_dict
from predet.config.pretrain import ViewConfig
from predet.data.views import make_two_views
from predet.evaluation.pretext import pretext_predictions
from predet.pretrain import (
    PretrainConfig,
    build_pretrain_model,
    load_pretrain_config,
    read_vocab,
)

SIDES = [(0, 12), (12, 20), (20, 32), (32, 64), (64, 10_000)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--config", default="pretrain/fashiondet_r18_cpu",
                        help="for a checkpoint saved without its config")
    parser.add_argument("--val", default="", help="held-out canvases (default: the config's data.val)")
    parser.add_argument("--images", type=int, default=64, help="held-out canvases, one view pair each")
    args = parser.parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    saved = state.get("config") if isinstance(state, dict) else None
    cfg = from_dict(PretrainConfig, saved) if saved else load_pretrain_config(args.config)
    views_cfg = cfg.data.views if isinstance(cfg.data.views, ViewConfig) else ViewConfig(**vars(cfg.data.views))
    num_classes = len(state.get("extra_state", {}).get("vocab") or read_vocab(cfg.data.vocab))
    model = build_pretrain_model(cfg, num_classes).eval()
    model.load_state_dict(state.get("model", state))
    val = Path(args.val or cfg.data.val)
    records = [json.loads(line) for line in open(val)][: args.images]
    root = val.parent
    pairs = [make_two_views(Image.open(root / r["image"]).convert("RGB"), 1000 + i, views_cfg)
             for i, r in enumerate(records)]
    batch = {k: torch.stack([p[k] for p in pairs]) for k in ("view1", "view2", "colour1", "colour2", "b1", "b2")}
    out = pretext_predictions(model, batch)
    b2 = batch["b2"].reshape(-1, 4)
    reachable = box_iou(b2, out["anchors"]).max(1).values >= 0.5
    hit = box_iou(b2, out["top_box"].reshape(-1, 4)).diag() >= 0.5
    side = ((b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])).sqrt()
    result = {"checkpoint": args.checkpoint, "config": "saved in the checkpoint" if saved else args.config,
              "anchor_sizes": list(cfg.model.anchor_sizes), "crpn_p2_small_anchor": cfg.model.crpn_p2_small_anchor,
              "queries": len(b2),
              "recall@0.5": hit.float().mean().item(), "reachable_by_an_anchor": reachable.float().mean().item(),
              "recall_on_reachable": hit[reachable].float().mean().item(), "by_query_side_px": {}}
    for lo, hi in SIDES:
        m = (side >= lo) & (side < hi)
        if m.any():
            result["by_query_side_px"][f"{lo}-{hi}"] = {"queries": int(m.sum()), "reachable": reachable[m].float().mean().item(),
                                                         "recall@0.5": hit[m].float().mean().item()}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
