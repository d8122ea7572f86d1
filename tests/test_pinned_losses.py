"""Pinned first losses of the default tiny run: the builds and the data are deterministic, so the first
steps' losses are exact numbers, and a change that moves them (a tokenizer, a template, the label mask, the
loss reduction, the sampler order, the optimizer step) fails here even when the loss still goes down.

The run is the default one (``conf/config.yaml``: tiny Gemma 3, LoRA, freeze=vision_frozen, AdamW + cosine
warmup, seed 42, micro batch 2, global batch 4) for three steps, on receipts this file writes itself in
CORD-v2's hub schema, so the synthetic receipts generator (``data/synthetic_receipts.py``, which the demo
tunes) does not move the numbers. What they depend on: the tiny Gemma 3 builder
(``models/tiny/gemma3.py``, its ``RECIPE_VERSION``), the CORD-v2 record -> conversation -> Donut target
(``data/sets/cord_v2.py``, ``data/cord.py``), the collator's label mask, the loss (``training/loss.py``),
the sampler, the default configs above (in fp32: ``parallel.mixed_precision=no``) (``dataset.max_length`` and ``prompt`` from
``conf/dataset/synthetic_receipts.yaml``) and the torch/transformers CPU kernels.

A deliberate change to any of these changes the values: rerun this file with ``-s`` (the measured losses are
printed on failure), check the change is meant, and paste the new values into ``PINNED``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose

# Losses of steps 1-3 (step 1 is before any update: the model, the data and the batching alone).
PINNED = [10.5295654296875, 9.696183461991568, 8.547159537994604]
MENU = [("ICE TEA", 6_000), ("NASI GORENG", 25_000), ("KOPI SUSU", 15_000), ("BAKSO", 20_000)]


def _record(index: int) -> dict:
    """One receipt: a parse in CORD's key names and a plain drawn image (no font: pixels fixed everywhere)."""
    import io

    from PIL import Image, ImageDraw

    name, price = MENU[index % len(MENU)]
    count = 1 + index % 3
    parse = {"menu": {"nm": name, "cnt": str(count), "price": f"{count * price:,}"},
             "total": {"total_price": f"{count * price:,}"}}
    image = Image.new("RGB", (256, 384), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for line in range(3 + index % 4):
        draw.rectangle((16, 24 + 40 * line, 64 + 37 * ((index + line) % 5), 44 + 40 * line), fill=(20, 20, 20))
    draw.rectangle((160, 300, 240, 330), fill=(10 * index % 256, 60, 120))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"image": {"bytes": buf.getvalue(), "path": None}, "ground_truth": json.dumps({"gt_parse": parse})}


def _write_receipts(root: Path, count: int = 12) -> Path:
    from datasets import Dataset, Features, Image, Value

    records = [_record(i) for i in range(count)]
    features = Features({"image": Image(), "ground_truth": Value("string")})
    (root / "data").mkdir(parents=True)
    Dataset.from_dict({k: [r[k] for r in records] for k in ("image", "ground_truth")},
                      features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


@pytest.mark.slow
def test_default_run_first_losses_are_pinned(tmp_path):
    from vlm_sweep.train import run

    data = _write_receipts(tmp_path / "receipts")
    # fp32 explicitly: the pins are fp32 numbers whatever auto picks on the CPU the test lands on.
    cfg = compose(["tracking=none", "eval=none", "step_scheduler.max_steps=3", "step_scheduler.ckpt_every_steps=3",
                   f"dataset.path={data}", "dataset.synthetic=null", "dataset.val_split=null",
                   "parallel.mixed_precision=no"])
    assert cfg.model.name == "tiny_gemma3" and cfg.peft.method == "lora" and cfg.seed == 42
    result = run(cfg, tmp_path / "run")
    assert result.status == "FINISHED" and result.step == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert losses == pytest.approx(PINNED, rel=1e-4), f"measured {losses}"
