"""The held-out pretext diagnostics of a fixed tiny model, in one process or under torchrun
(tests only): ``python tests/torchrun_pretext.py HELDOUT VOCAB OUT.json`` (rank 0 writes OUT.json)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_model  # noqa: E402

from predet.config.pretrain import ViewConfig
from predet.data.build import heldout_dataset
from predet.data.views import (  # noqa: E402
    TwoViewTransform,
    WholeImageTransform,
    collate_images,
    collate_two_view,
    decorrelated_colours,
)
from predet.data.weak import Vocabulary  # noqa: E402
from predet.engine.launch import launched  # noqa: E402
from predet.evaluation.pretext import PretextDiagnosticsHook  # noqa: E402

heldout, vocab_file, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
views = ViewConfig(size=64, num_queries=4, min_query_px=6)
with launched("cpu") as where:
    vocab = Vocabulary.load_json(vocab_file)
    torch.manual_seed(0)
    model = tiny_model(len(vocab)).eval()
    pairs = heldout_dataset(heldout, vocab, TwoViewTransform(decorrelated_colours(views)), 12)
    images = heldout_dataset(heldout, vocab, WholeImageTransform(64), 12)
    hook = PretextDiagnosticsHook(pairs, collate_two_view, period=1, num_pairs=12, batch_size=4, images=images,
                                  collate_images=collate_images, image_batch_size=5, num_workers=1)
    result = hook.run(model, where.device, where.rank, where.world_size)
    if where.is_main:
        out.write_text(json.dumps(result, sort_keys=True))
