"""The PreDet supplement's tables, transcribed as plain data.

One transcription is the single source for the named presets (``predet.config.presets``)
and for ``predet report --paper``, so a number is typed once. Cell text is kept as the
supplement writes it ('PreDet -IG50M', 'cls-Imagenet', '3×'); a '-' cell is None.

Layout decisions (the supplement is extracted text, so merged cells appear blank):
- Table 1: ``dataset`` and ``model`` are written on the first row of each block only; they are
  filled down (merged cells).
- Table 2: ``dataset-size`` is filled down the same way. ``pre-training`` is written only on
  row 1 of each 3-row block ('from-scratch'); rows 2-3 are blank and kept None, because three
  different settings for one model and one dataset size cannot all be 'from-scratch' — the
  labels of rows 2-3 were lost and are not guessed. ``block_row`` (1-3) records the position.
- Tables 3 and 4: ``pre-training`` is filled down (scratch 3×/6×/9×, ...).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

SUPPLEMENT = "PreDet supplement (Ramanathan, Wang, Mahajan)"

# ----------------------------------------------------------------------------------------
# §1: hyper-parameter search sets
# ----------------------------------------------------------------------------------------

SEARCH_GRIDS: dict[str, dict[str, list]] = {
    # "The learning rate, γ and scaling factor (lr_{mf}) were searched in the following sets
    # respectively: (0.005, 0.01, 0.02, 0.03, 0.04), (0.1, 0.15, 0.2) and (1.0, 4.0)."
    "table1": {"lr": [0.005, 0.01, 0.02, 0.03, 0.04], "gamma": [0.1, 0.15, 0.2], "lr_mf": [1.0, 4.0]},
    # "best learning rate and γ from the following sets respectively: (0.04, 0.03, 0.02) and
    # (0.02, 0.05, 0.1). [...] 60k, 70k, 130k iterations in addition to standard 1×, 2×"
    "small_data": {"lr": [0.04, 0.03, 0.02], "gamma": [0.02, 0.05, 0.1],
                   "schedule": ["60k", "70k", "130k", "1x", "2x"]},
}
SEARCH_GRID_SOURCES: dict[str, str] = {
    "table1": "Supplement §1, ResNext-101-32x8d + FPN paragraph (grid behind Table 1)",
    "small_data": "Supplement §1, 'smaller target datasets' paragraph (grid behind Table 2)",
}

# ----------------------------------------------------------------------------------------
# Table 1: best lr, γ, lr_mf for X101-32x8d + FPN
# ----------------------------------------------------------------------------------------

TABLE1_COLUMNS: dict[str, str] = {
    "pre-training": "pre-training", "dataset": "dataset", "model": "model",
    "lr": "lr", "gamma": "γ", "lr_mf": "lr_{mf}",
}
TABLE1_CAPTION = ("Table 1. Learning rate parameters used for fine-tuning Resnext-101-32x8d+FPN "
                  "pre-trained with different methods, for different models and datasets.")

# (pre-training, dataset or None = same as above, model or None = same as above, lr, γ, lr_mf)
_TABLE1_TEXT = [
    ("from-scratch", "COCO", "mask-RCNN", 0.02, 0.1, 4.0),
    ("cls-Imagenet", None, None, 0.02, 0.1, 1.0),
    ("cls-IG50M", None, None, 0.01, 0.15, 1.0),
    ("SEER-1B", None, None, 0.02, 0.1, 4.0),
    ("Infomin", None, None, 0.02, 0.1, 4.0),
    ("PreDet -ImageNet", None, None, 0.02, 0.1, 4.0),
    ("PreDet -IG50M", None, None, 0.01, 0.1, 4.0),
    ("from-scratch", "LVIS-v1", "mask-RCNN", 0.02, 0.1, 4.0),
    ("cls-Imagenet", None, None, 0.02, 0.1, 1.0),
    ("cls-IG50M", None, None, 0.01, 0.15, 1.0),
    ("SEER-1B", None, None, 0.02, 0.1, 4.0),
    ("Infomin", None, None, 0.02, 0.1, 4.0),
    ("PreDet -ImageNet", None, None, 0.02, 0.1, 4.0),
    ("PreDet -IG50M", None, None, 0.005, 0.2, 4.0),
    ("from-scratch", "COCO", "Retinanet", 0.02, 0.1, None),
    ("cls-Imagenet", None, None, 0.01, 0.1, None),
    ("cls-IG50M", None, None, 0.01, 0.1, None),
    ("SEER-1B", None, None, 0.01, 0.1, None),
    ("Infomin", None, None, 0.01, 0.1, None),
    ("PreDet -ImageNet", None, None, 0.01, 0.1, None),
    ("PreDet -IG50M", None, None, 0.01, 0.1, None),
]

# ----------------------------------------------------------------------------------------
# §1 sentences: R50 + FPN and Regnet64 + FPN
# ----------------------------------------------------------------------------------------

R50_TEXT = ("R50 + FPN for mask-RCNN : For PreDet -IG50M model, we used lr, γ values of 0.01, 0.15 "
            "and did not scale the learning rate for the mask-head parameters.")
R50_COLUMNS: dict[str, str] = {
    "pre-training": "pre-training", "backbone": "backbone", "model": "model",
    "lr": "lr", "gamma": "γ", "lr_mf": "lr_{mf}",
}
# "did not scale the learning rate for the mask-head parameters" = lr_mf 1.0
R50_ROWS: list[dict[str, Any]] = [
    {"pre-training": "PreDet -IG50M", "backbone": "R50 + FPN", "model": "mask-RCNN",
     "lr": 0.01, "gamma": 0.15, "lr_mf": 1.0},
]

REGNET_TEXT = ("Regnet64 + FPN for mask-RCNN : We use lr of 0.01 and γ of 0.1 for PreDet. We use lr of "
               "0.02 and γ of 0.1 for Imagenet pre-trained and SEER-IG1B models. As per SEER, we use a "
               "weight decay of 5e-5 for both pre-training and fine-tuning.")
REGNET_COLUMNS: dict[str, str] = {
    "pre-training": "pre-training", "backbone": "backbone", "model": "model",
    "lr": "lr", "gamma": "γ", "weight_decay": "weight decay",
}
_REGNET_WEIGHT_DECAY = 5e-5  # "for both pre-training and fine-tuning", all three models
REGNET_ROWS: list[dict[str, Any]] = [
    {"pre-training": name, "backbone": "Regnet64 + FPN", "model": "mask-RCNN",
     "lr": lr, "gamma": gamma, "weight_decay": _REGNET_WEIGHT_DECAY}
    for name, lr, gamma in (("PreDet", 0.01, 0.1),
                            ("Imagenet pre-trained", 0.02, 0.1),
                            ("SEER-IG1B", 0.02, 0.1))
]

# ----------------------------------------------------------------------------------------
# Table 2: smaller COCO subsets
# ----------------------------------------------------------------------------------------

TABLE2_COLUMNS: dict[str, str] = {
    "pre-training": "pre-training", "dataset-size": "dataset-size", "block_row": "row in block",
    "train schedule": "train schedule", "lr": "lr", "gamma": "γ",
}
TABLE2_CAPTION = "Table 2. Learning rate parameters and fine-tuning used for target datasets of different sizes."

# (pre-training or None = blank cell, dataset-size or None = same as above, schedule, lr, γ)
_TABLE2_TEXT = [
    ("from-scratch", "35k", "540k", 0.04, 0.02),
    (None, None, "90k", 0.04, 0.02),
    (None, None, "90k", 0.04, 0.02),
    ("from-scratch", "10k", "90k", 0.04, 0.02),
    (None, None, "60k", 0.03, 0.02),
    (None, None, "60k", 0.02, 0.1),
    ("from-scratch", "5k", "80k", 0.02, 0.1),
    (None, None, "60k", 0.02, 0.1),
    (None, None, "60k", 0.02, 0.1),
    ("from-scratch", "1k", "60k", 0.02, 0.1),
    (None, None, "60k", 0.02, 0.1),
    (None, None, "60k", 0.02, 0.1),
]

# ----------------------------------------------------------------------------------------
# Tables 3 and 4: detailed results
# ----------------------------------------------------------------------------------------

_MRCNN_METRICS = ["ap_bbox", "ap50_bbox", "ap75_bbox", "ap_mask", "ap50_mask", "ap75_mask"]
_METRIC_LABELS = {"ap_bbox": "AP^bbox", "ap50_bbox": "AP50^bbox", "ap75_bbox": "AP75^bbox",
                  "ap_mask": "AP^mask", "ap50_mask": "AP50^mask", "ap75_mask": "AP75^mask"}

TABLE3_COLUMNS: dict[str, str] = {
    "pre-training": "pre-training", "sched.": "sched.",
    **{f"mask_rcnn_{m}": f"mask-RCNN {_METRIC_LABELS[m]}" for m in _MRCNN_METRICS},
    **{f"retinanet_{m}": f"RetinaNet {_METRIC_LABELS[m]}" for m in _MRCNN_METRICS[:3]},
}
TABLE3_CAPTION = ("Table 3. Results on MS-COCO for mask-RCNN and RetinaNet, with ResNeXt-101-32x8d + FPN "
                  "backbone when pre-trained with different approaches. We report results upto the "
                  "minimum fine-tuning schedule at which the model's performance converges.")
_TABLE3_TEXT = """\
scratch	3×	43.3	63.0	47.7	38.8	60.4	41.6	38.9	57.8	41.8
	6×	45.6	65.6	49.6	40.4	62.8	43.9	40.7	60.0	43.3
	9×	45.8	65.6	50.2	40.7	63.0	44.2	40.7	59.7	43.4
cls-Imagenet	1×	43.8	65.3	47.9	39.0	61.6	42.3	41.4	61.8	44.1
	3×	44.3	64.5	48.6	39.5	61.7	42.6	-	-	-
	6×	44.9	64.9	49.0	39.9	62.2	43.0	-	-	-
SEER-IG1B	1×	44.3	65.7	48.6	39.9	62.4	43.1	40.3	59.9	43.2
	3×	45.1	65.6	49.4	40.1	62.7	43.2	41.7	60.9	44.7
Infomin	1×	44.8	65.5	49.0	40.2	62.5	43.5	43.0	62.8	46.4
	3×	45.6	65.9	49.9	40.5	63.2	43.6	-	-	-
cls-IG50M	1×	44.4	65.8	48.5	39.4	62.2	42.1	41.8	62.1	44.3
	3×	44.6	65.1	48.7	39.5	61.9	42.6	-	-	-
PreDet -Imagenet	1×	45.8	66.9	50.2	40.8	63.6	43.9	43.1	63.3	46.4
PreDet -IG50M	1×	47.1	68.2	51.6	41.7	65.2	45.1	45.1	67.8	50.6
"""

TABLE4_COLUMNS: dict[str, str] = {
    "pre-training": "pre-training", "sched.": "sched.",
    **{f"mask_rcnn_{m}": f"mask-RCNN {_METRIC_LABELS[m]}" for m in _MRCNN_METRICS},
}
TABLE4_CAPTION = ("Table 4. Results on LVIS-v1 for mask-RCNN with ResNeXt-101-32x8d + FPN backbone when "
                  "pre-trained with different approaches. We report results upto the minimum fine-tuning "
                  "schedule at which the model's performance converges. Results are averaged over 3 runs "
                  "for every model.")
_TABLE4_TEXT = """\
scratch	2×	22.6	35.9	24.1	21.7	33.6	22.9
	3×	26.1	40.1	28.4	25.1	38.1	27.0
	6×	28.0	42.4	30.4	26.9	40.3	28.9
cls-Imagenet	1×	24.5	39.2	26.3	24.3	37.2	25.9
	2×	26.1	40.5	28.3	25.1	38.2	27.1
	3×	25.6	39.6	27.6	24.8	37.5	26.2
SEER-IG1B	1×	28.2	44.3	30.0	27.7	41.8	29.5
	2×	28.6	43.8	30.8	27.8	41.4	29.8
Infomin	1×	25.3	39.6	27.1	24.7	37.6	26.5
	2×	27.3	41.6	29.6	26.3	39.4	28.3
PreDet -ImageNet	1×	26.1	40.7	27.7	25.6	38.6	27.3
PreDet -IG50M	1×	30.1	46.7	32.1	29.2	44.2	31.1
"""

# ----------------------------------------------------------------------------------------
# Building the rows
# ----------------------------------------------------------------------------------------


def fill_down(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Copy a blank (None) cell from the row above: how merged cells read once extracted."""
    last: dict[str, Any] = {}
    out = []
    for row in rows:
        row = dict(row)
        for k in keys:
            if row.get(k) is None:
                row[k] = last.get(k)
            last[k] = row[k]
        out.append(row)
    return out


def _cell(text: str) -> float | None:
    text = text.strip()
    return None if text == "-" else float(text)


def _parse_results(text: str, columns: Mapping[str, str]) -> list[dict[str, Any]]:
    """Tab-separated rows as extracted from the supplement; blank first cell = same as above."""
    keys = list(columns)
    rows = []
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) != len(keys):
            raise ValueError(f"expected {len(keys)} cells, got {len(cells)}: {line!r}")
        row = {"pre-training": cells[0].strip() or None, "sched.": cells[1].strip()}
        row.update({k: _cell(c) for k, c in zip(keys[2:], cells[2:])})
        rows.append(row)
    return fill_down(rows, ["pre-training"])


def _table1() -> list[dict[str, Any]]:
    keys = list(TABLE1_COLUMNS)
    return fill_down([dict(zip(keys, r)) for r in _TABLE1_TEXT], ["dataset", "model"])


def _table2() -> list[dict[str, Any]]:
    rows = []
    for i, (pre, size, sched, lr, gamma) in enumerate(_TABLE2_TEXT):
        rows.append({"pre-training": pre, "dataset-size": size, "block_row": i % 3 + 1,
                     "train schedule": sched, "lr": lr, "gamma": gamma})
    return fill_down(rows, ["dataset-size"])


TABLE1: list[dict[str, Any]] = _table1()
TABLE2: list[dict[str, Any]] = _table2()
TABLE3: list[dict[str, Any]] = _parse_results(_TABLE3_TEXT, TABLE3_COLUMNS)
TABLE4: list[dict[str, Any]] = _parse_results(_TABLE4_TEXT, TABLE4_COLUMNS)

# name -> (rows, columns {key: header label}, caption)
TABLES: dict[str, tuple[list[dict[str, Any]], dict[str, str], str]] = {
    "table1": (TABLE1, TABLE1_COLUMNS, TABLE1_CAPTION),
    "r50": (R50_ROWS, R50_COLUMNS, R50_TEXT),
    "regnet": (REGNET_ROWS, REGNET_COLUMNS, REGNET_TEXT),
    "table2": (TABLE2, TABLE2_COLUMNS, TABLE2_CAPTION),
    "table3": (TABLE3, TABLE3_COLUMNS, TABLE3_CAPTION),
    "table4": (TABLE4, TABLE4_COLUMNS, TABLE4_CAPTION),
}

# ----------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value).replace("|", "\\|")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | Mapping[str, str]) -> str:
    """Markdown table of ``rows``; ``columns`` is a list of keys or a {key: header} mapping.

    A None cell prints as '-', as the supplement writes a missing result.
    """
    labels = dict(columns) if isinstance(columns, Mapping) else {k: k for k in columns}
    keys = list(labels)
    lines = [
        "| " + " | ".join(_format_cell(labels[k]) for k in keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    lines += ["| " + " | ".join(_format_cell(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def format_paper_table(name: str) -> str:
    """One supplement table as Markdown followed by its caption (for ``predet report --paper``)."""
    if name not in TABLES:
        raise ValueError(f"unknown paper table {name!r}; valid names: {', '.join(TABLES)}")
    rows, columns, caption = TABLES[name]
    return format_table(rows, columns) + "\n\n" + caption
