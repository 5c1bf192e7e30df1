"""benchmarks/crpn_recall_by_size.py measures a checkpoint with its own model and anchors."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "crpn_recall_by_size.py"


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("crpn_recall_by_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_split_uses_the_checkpoints_own_config(monkeypatch, pretrain_checkpoint, fashiondet_tiny):
    """The tiny checkpoint's FPN (32 channels) and anchors (8 px up) differ from the shipped
    config's (128, 16 px up): it loads only when built from its saved config, and the
    reachable share is measured with its own anchors."""
    script = load_script(monkeypatch)
    result = script.main([str(pretrain_checkpoint), "--val", str(fashiondet_tiny / "weak" / "heldout_clean.jsonl"),
                          "--images", "4"])
    assert result["config"] == "saved in the checkpoint"
    assert result["anchor_sizes"][0] == 8
    assert result["queries"] == 4 * 4  # 4 canvases, 4 queries per view pair in the tiny recipe
    assert sum(b["queries"] for b in result["by_query_side_px"].values()) == result["queries"]
    assert 0.0 <= result["recall@0.5"] <= 1.0 and 0.0 < result["reachable_by_an_anchor"] <= 1.0
