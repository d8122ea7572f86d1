"""Data pipeline: CORD loading, bad records, hub-less failure, the sharded sampler, collation."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import compose
from vlm_sweep.donut import json2token
from vlm_sweep.data.datasets import (BadRecordError, ConversationDataset, DatasetLoadError,
                                     build_datasets, load_split)
from vlm_sweep.data.sampler import ShardedIndexSampler

GOOD_PARSE = {"menu": [{"nm": "KOPI", "cnt": "1", "price": "10,000"},
                       {"nm": "ROTI", "cnt": "2", "price": "20,000"}],
              "total": {"total_price": "30,000"}}


@pytest.fixture(scope="module")
def processor(gemma3_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(gemma3_dir)


@pytest.fixture(scope="module")
def receipts(receipts_dir):
    """The synthetic receipts' train split as the default config builds it."""
    cfg = compose()
    assert Path(cfg.dataset.path).resolve() == Path(receipts_dir).resolve()
    return build_datasets(cfg.dataset)["train"]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow cache of throw-away data sets out of the user's HF cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _png(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


BAD_ROWS = {  # index -> what is wrong with it
    1: "corrupt image",
    2: "undecodable ground_truth JSON",
    3: "empty gt_parse",
    4: "ground_truth is not an object",
    5: "ground_truth without gt_parse",
}


@pytest.fixture
def bad_cord_dir(tmp_path, datasets_cache) -> Path:
    """A local data set in CORD-v2's schema: rows 0 and 6 good, rows 1-5 bad."""
    from datasets import Dataset, Features, Image, Value

    png = _png()
    good = json.dumps({"gt_parse": GOOD_PARSE, "meta": {"version": "2.0.0"}})
    rows = [
        ({"bytes": png, "path": None}, good),
        ({"bytes": png[: len(png) // 2], "path": None}, good),       # truncated PNG
        ({"bytes": png, "path": None}, '{"gt_parse": {"total": '),    # broken JSON
        ({"bytes": png, "path": None}, json.dumps({"gt_parse": {}})),
        ({"bytes": png, "path": None}, json.dumps(["not", "an", "object"])),
        ({"bytes": png, "path": None}, json.dumps({"meta": {}})),
        ({"bytes": _png(color=(10, 10, 200)), "path": None}, good),
    ]
    root = tmp_path / "cord_local"
    path = root / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    features = Features({"image": Image(), "ground_truth": Value("string")})
    Dataset.from_dict({"image": [r[0] for r in rows], "ground_truth": [r[1] for r in rows]},
                      features=features).to_parquet(str(path))
    return root


def _local_dataset(root: Path, mode: str, *extra: str) -> ConversationDataset:
    cfg = compose(["dataset=cord_v2", f"dataset.path={root}", f"dataset.on_bad_record={mode}", *extra])
    return ConversationDataset(load_split(cfg.dataset, "train"), cfg.dataset, "train")


# ---------------------------------------------------------------- CORD records


def test_cord_records_load_lazily(receipts, monkeypatch):
    from datasets.features.image import Image

    decoded = []
    original = Image.decode_example

    def counting(self, value, *args, **kwargs):
        decoded.append(1)
        return original(self, value, *args, **kwargs)

    monkeypatch.setattr(Image, "decode_example", counting)
    cfg = compose(["dataset.max_train_samples=10"])
    built = build_datasets(cfg.dataset)
    assert len(built["train"]) == 10 and len(built["validation"]) == cfg.dataset.synthetic.num_validation
    hints = built["train"].length_hints()
    assert len(hints) == 10 and all(h > 0 for h in hints)
    assert decoded == [], "images decoded before any record was asked for"
    built["train"][3]
    assert len(decoded) == 1


def test_cord_records_become_conversations_with_donut_targets(receipts):
    cfg = compose()
    ground_truths = receipts.hf_split.select_columns(["ground_truth"])["ground_truth"]
    assert len(receipts) == cfg.dataset.synthetic.num_train
    for index in range(len(receipts)):
        sample = receipts[index]
        assert sample.record_id == f"synthetic_receipts/train[{index}]"
        user, assistant = sample.conversation
        assert user["role"] == "user" and assistant["role"] == "assistant"
        image, prompt = user["content"]
        assert image["type"] == "image" and image["image"].mode == "RGB"
        assert prompt == {"type": "text", "text": cfg.dataset.prompt}
        expected = json2token(json.loads(ground_truths[index])["gt_parse"])
        assert assistant["content"] == [{"type": "text", "text": expected}]
        assert expected.startswith("<s_")


# ---------------------------------------------------------------- bad records


def test_good_rows_of_a_local_cord_copy_load(bad_cord_dir):
    ds = _local_dataset(bad_cord_dir, "error")
    assert len(ds) == 7
    for index in (0, 6):
        sample = ds[index]
        assert sample.record_id == f"cord_v2/train[{index}]"
        assert sample.conversation[1]["content"][0]["text"] == json2token(GOOD_PARSE)


@pytest.mark.parametrize("index", sorted(BAD_ROWS), ids=[BAD_ROWS[i] for i in sorted(BAD_ROWS)])
def test_bad_record_raises_naming_the_record(bad_cord_dir, index):
    ds = _local_dataset(bad_cord_dir, "error")
    with pytest.raises(BadRecordError) as err:
        ds[index]
    assert f"cord_v2/train[{index}]" in str(err.value)


def test_bad_records_are_skipped_and_counted(bad_cord_dir, processor, caplog):
    from torch.utils.data import DataLoader

    from vlm_sweep.data.collate import VLMCollator

    ds = _local_dataset(bad_cord_dir, "skip")
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert [i for i, item in enumerate(items) if item is None] == sorted(BAD_ROWS)
    for index in BAD_ROWS:  # the log says which records were dropped
        assert f"cord_v2/train[{index}]" in caplog.text

    collator = VLMCollator(processor, max_length=4096, on_bad_record="skip")
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collator, shuffle=False))
    assert [b["num_skipped"] for b in batches] == [3, 2]
    assert [b["record_ids"] for b in batches] == [["cord_v2/train[0]"], ["cord_v2/train[6]"]]
    assert all(b["input_ids"].shape[0] == 1 and "labels" in b for b in batches)


def _token_lengths(collator, samples):
    return [int(collator([s])["attention_mask"].sum()) for s in samples]


def test_over_long_example_is_a_bad_record(receipts, processor):
    from vlm_sweep.data.collate import VLMCollator

    samples = [receipts[i] for i in range(4)]
    lengths = _token_lengths(VLMCollator(processor, max_length=100_000), samples)
    assert len(set(lengths)) > 1
    limit = sorted(lengths)[1]  # the shortest two fit (or more on ties), the longest does not
    too_long = [s.record_id for s, n in zip(samples, lengths) if n > limit]
    assert too_long

    cfg = compose([f"dataset.max_length={limit}", "dataset.on_bad_record=error"])
    collator = VLMCollator(processor, cfg.dataset.max_length, cfg.dataset.on_bad_record)
    with pytest.raises(BadRecordError) as err:
        collator(samples)
    assert too_long[0] in str(err.value) and "dataset.max_length" in str(err.value)

    cfg = compose([f"dataset.max_length={limit}", "dataset.on_bad_record=skip"])
    collator = VLMCollator(processor, cfg.dataset.max_length, cfg.dataset.on_bad_record)
    batch = collator(samples + [None])
    assert batch["num_skipped"] == len(too_long) + 1
    assert batch["record_ids"] == [s.record_id for s, n in zip(samples, lengths) if n <= limit]
    assert int(batch["attention_mask"].sum(dim=1).max()) <= limit
    assert batch["input_ids"].shape[1] <= limit

    # Nothing fits: an empty batch that still reports what it dropped.
    empty = VLMCollator(processor, min(lengths) - 1, "skip")(samples)
    assert empty["num_skipped"] == 4 and empty["record_ids"] == [] and "input_ids" not in empty


# ---------------------------------------------------------------- loading failures


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", ["0", "1"])
def test_missing_local_dataset_without_hub_fails_fast(tmp_path, monkeypatch, datasets_cache, offline):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    missing = tmp_path / "no_such_dataset"
    cfg = compose(["dataset=cord_v2", f"dataset.path={missing}"])
    start = time.monotonic()
    with pytest.raises(DatasetLoadError) as err:
        build_datasets(cfg.dataset)
    assert time.monotonic() - start < 10
    assert str(missing) in str(err.value)
    assert not missing.exists()


def test_missing_split_is_a_dataset_load_error_naming_it(bad_cord_dir):
    cfg = compose(["dataset=cord_v2", f"dataset.path={bad_cord_dir}"])  # no validation split on disk
    with pytest.raises(DatasetLoadError) as err:
        build_datasets(cfg.dataset)
    assert "'validation'" in str(err.value) and str(bad_cord_dir) in str(err.value)
    assert set(build_datasets(compose(["dataset=cord_v2", f"dataset.path={bad_cord_dir}",
                                       "dataset.val_split=null"]).dataset)) == {"train"}


# ---------------------------------------------------------------- sampler


def test_sampler_is_deterministic_per_seed():
    def stream(seed, n=200):
        it = iter(ShardedIndexSampler(37, seed=seed))
        return [next(it) for _ in range(n)]

    assert stream(0) == stream(0)
    assert stream(1) == stream(1)
    assert stream(0) != stream(1)
    assert ShardedIndexSampler(37, seed=5, rank=1, world_size=2).epoch_order(3) == \
        ShardedIndexSampler(37, seed=5, rank=1, world_size=2).epoch_order(3)


def test_sampler_epochs_are_different_permutations():
    sampler = ShardedIndexSampler(50, seed=3)
    epochs = [sampler.epoch_order(e) for e in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(50))
    assert len({tuple(o) for o in epochs}) == 4
    # The endless stream is exactly those epochs back to back.
    it = iter(sampler)
    assert [next(it) for _ in range(200)] == sum(epochs, [])


@pytest.mark.parametrize("num_samples", [10, 17, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sampler_ranks_partition_each_epoch(num_samples, world_size):
    pad = (-num_samples) % world_size
    for epoch in range(3):
        shards = [ShardedIndexSampler(num_samples, rank=r, world_size=world_size, seed=7).epoch_order(epoch)
                  for r in range(world_size)]
        assert len({len(s) for s in shards}) == 1, "ranks must see the same number of samples"
        flat = sum(shards, [])
        assert set(flat) == set(range(num_samples))
        assert len(flat) == num_samples + pad
        counts = np.bincount(flat, minlength=num_samples)
        assert counts.max() <= 2 and int((counts == 2).sum()) == pad


@pytest.mark.parametrize("num_samples,world_size", [(1, 3), (3, 8)])
def test_sampler_gives_every_rank_work_when_data_is_smaller_than_the_world(num_samples, world_size):
    """Each rank must get the same, non-zero number of indices (an empty shard makes that rank's
    endless iterator spin forever, and unequal shards hang DDP's collectives)."""
    shards = [ShardedIndexSampler(num_samples, rank=r, world_size=world_size).epoch_order(0)
              for r in range(world_size)]
    assert [len(s) for s in shards] == [len(shards[0])] * world_size
    assert len(shards[0]) >= 1
    assert set(sum(shards, [])) == set(range(num_samples))


def _padding(order, lengths, batch_size):
    total = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        total += sum(max(batch) - n for n in batch)
    return total


@pytest.mark.parametrize("world_size", [1, 2])
def test_length_grouping_cuts_padding_and_stays_random(world_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 2000, size=400).tolist()
    batch_size = 4

    def total_padding(use_lengths, seed=0):
        total = 0
        for rank in range(world_size):
            sampler = ShardedIndexSampler(400, rank=rank, world_size=world_size, seed=seed,
                                          lengths=lengths if use_lengths else None, batch_size=batch_size)
            for epoch in range(3):
                total += _padding(sampler.epoch_order(epoch), lengths, batch_size)
        return total

    assert total_padding(True) < 0.5 * total_padding(False)
    grouped = ShardedIndexSampler(400, seed=0, lengths=lengths, batch_size=batch_size)
    assert sorted(grouped.epoch_order(0)) == list(range(400))
    assert grouped.epoch_order(0) != grouped.epoch_order(1)
    other_seed = ShardedIndexSampler(400, seed=1, lengths=lengths, batch_size=batch_size)
    assert grouped.epoch_order(0) != other_seed.epoch_order(0)


def test_length_hints_cut_real_token_padding(receipts, processor):
    """dataset.group_by_length uses length_hints(); it must track real token counts."""
    from vlm_sweep.data.collate import VLMCollator

    tokens = _token_lengths(VLMCollator(processor, 100_000), [receipts[i] for i in range(len(receipts))])
    hints = receipts.length_hints()
    plain = ShardedIndexSampler(len(receipts), seed=0)
    grouped = ShardedIndexSampler(len(receipts), seed=0, lengths=hints, batch_size=2)
    pad_plain = sum(_padding(plain.epoch_order(e), tokens, 2) for e in range(3))
    pad_grouped = sum(_padding(grouped.epoch_order(e), tokens, 2) for e in range(3))
    assert pad_grouped < 0.5 * pad_plain


# ---------------------------------------------------------------- collate


def test_collate_pads_right_to_the_longest_in_the_batch(receipts, processor):
    from vlm_sweep.data.collate import IGNORE_INDEX, VLMCollator

    collator = VLMCollator(processor, max_length=4096)
    samples = [receipts[i] for i in range(4)]
    alone = [collator([s])["input_ids"][0].tolist() for s in samples]
    lengths = [len(ids) for ids in alone]
    assert len(set(lengths)) > 1
    pad_id = processor.tokenizer.pad_token_id

    for order in (samples, samples[::-1]):
        batch = collator(order)
        expected = alone if order is samples else alone[::-1]
        width = max(lengths)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, width)
        assert batch["labels"].shape == (4, width)
        assert batch["pixel_values"].shape[0] == 4
        for row, ids in enumerate(expected):
            n = len(ids)
            assert batch["input_ids"][row, :n].tolist() == ids  # content first: right padding
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert batch["input_ids"][row, n:].tolist() == [pad_id] * (width - n)
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["record_ids"] == [s.record_id for s in order] and batch["num_skipped"] == 0
