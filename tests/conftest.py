import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def fashiondet_tiny(tmp_path_factory) -> Path:
    """A tiny FashionDet build (weak set + detection splits), made once per test session."""
    from predet.data.fashiondet import build_fashiondet

    out = tmp_path_factory.mktemp("fashiondet_tiny")
    build_fashiondet(out, size="tiny", seed=0, canvas=96, progress=False)
    return out


@pytest.fixture(scope="session")
def pretrain_checkpoint(fashiondet_tiny, tmp_path_factory) -> Path:
    """A few iterations of tiny PreDet pre-training: a real checkpoint to fine-tune from."""
    from helpers import tiny_pretrain_config

    from predet.pretrain import pretrain

    run = tmp_path_factory.mktemp("pretrain_run")
    result = pretrain(tiny_pretrain_config(fashiondet_tiny / "weak", run, 3))
    return run / "checkpoints" / "model_final.pth"
