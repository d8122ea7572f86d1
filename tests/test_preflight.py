"""Data pre-flight: the data checked against the model before training, and its CLI (vlm_sweep.inspect).

Every number in the report is checked against an independent count: the run's collator on each
record and on micro batches in sampler order, and the model config's own image/video token ids.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from conftest import FAMILIES, ROOT, compose
from vlm_sweep.config.validate import ConfigError
from vlm_sweep.data.sets import get_spec
from vlm_sweep.data.collate import VLMCollator
from vlm_sweep.data.datasets import BadRecordError, build_datasets
from vlm_sweep.data.formats import assistant_texts
from vlm_sweep.data.preflight import media_kinds, run_preflight, sample_indices
from vlm_sweep.data.preflight_report import format_report
from vlm_sweep.data.sampler import ShardedIndexSampler
from vlm_sweep.inspect import find_conf_dir, load_processor_only
from vlm_sweep.models.registry import get_family

MODELS = FAMILIES
_PROCESSORS: dict = {}


def _processor(cfg):
    if cfg.model.name not in _PROCESSORS:
        _PROCESSORS[cfg.model.name] = load_processor_only(cfg.model)
    return _PROCESSORS[cfg.model.name]


def _parts(overrides):
    """(cfg, processor, family, datasets, collator) exactly as the recipe builds them."""
    cfg = compose(overrides)
    processor = _processor(cfg)
    collator = VLMCollator.for_dataset(processor, cfg.dataset)
    return cfg, processor, get_family(cfg.model.family), build_datasets(cfg.dataset), collator


def _preflight(overrides, sample_size=None):
    cfg, processor, family, datasets, collator = _parts(overrides)
    return run_preflight(cfg, processor, family, datasets, collator, sample_size=sample_size)


def _model_config(cfg):
    return transformers.AutoConfig.from_pretrained(cfg.model.pretrained_model_name_or_path)


RECEIPTS = ["dataset.max_train_samples=6", "dataset.max_val_samples=2", "step_scheduler.micro_batch_size=2"]


@pytest.mark.parametrize("model", MODELS)
def test_report_numbers_match_the_collator_and_the_model_config(model, receipts_dir):
    cfg, processor, family, datasets, collator = _parts([f"model={model}", *RECEIPTS])
    report = run_preflight(cfg, processor, family, datasets, collator, sample_size=None)
    assert report.checked == {"train": 6, "validation": 2} and report.skipped == {} and report.usable == 8

    image_id = _model_config(cfg).image_token_id  # the model's own placeholder id, not the processor's
    lengths, images = [], 0
    for dataset in datasets.values():
        for i in range(len(dataset)):
            batch = collator([dataset[i]])
            lengths.append(int(batch["attention_mask"].sum()))
            images += int((batch["input_ids"] == image_id).sum())
    assert report.lengths == lengths
    assert images > 0 and report.image_tokens == images and report.video_tokens == 0
    assert report.text_tokens == sum(lengths) - images
    assert sum(count for _, count in report.histogram()) == 8

    # Padding: the train split batched by the real collator in the run's sampler order.
    train = datasets["train"]
    hints = train.length_hints() if cfg.dataset.group_by_length else None
    order = ShardedIndexSampler(len(train), seed=cfg.seed, lengths=hints, batch_size=2).epoch_order(0)
    real = processed = 0
    for k in range(0, len(order), 2):
        mask = collator([train[i] for i in order[k:k + 2]])["attention_mask"]
        real, processed = real + int(mask.sum()), processed + mask.numel()
    assert real < processed  # receipts differ in length: a batch of two pads
    assert report.padding == (real, processed, 3)
    assert report.padding_efficiency == pytest.approx(real / processed)

    # The label mask: the answer is what trains, the prompt is not.
    record, rendered = report.label_preview
    assert record == "synthetic_receipts/train[0]"
    trained = "".join(re.findall(r"\[\[(.*?)\]\]", rendered, flags=re.S))
    answer = assistant_texts(train.build(0).conversation)[0]
    assert answer in trained and cfg.dataset.prompt not in trained and cfg.dataset.prompt in rendered
    text = format_report(report)
    assert f"{real} real of {processed} processed tokens" in text and "[[" in text and "usable" in text


@pytest.mark.parametrize("pack_length", ["null", "512"])
def test_packed_padding_is_what_the_packed_collator_runs(pack_length, receipts_dir):
    """With dataset.packing the report counts the rows the collator really builds (padded to the longest row)."""
    cfg, processor, family, datasets, collator = _parts(
        ["model=tiny_gemma3", "dataset.max_train_samples=6", "dataset.max_val_samples=2",
         "step_scheduler.micro_batch_size=3", "step_scheduler.global_batch_size=3", "dataset.packing=true",
         f"dataset.pack_length={pack_length}"])
    assert collator.packing
    report = run_preflight(cfg, processor, family, datasets, collator, sample_size=None)
    train = datasets["train"]
    hints = train.length_hints() if cfg.dataset.group_by_length else None
    order = ShardedIndexSampler(len(train), seed=cfg.seed, lengths=hints, batch_size=3).epoch_order(0)
    real = processed = 0
    for k in range(0, len(order), 3):
        batch = collator([train[i] for i in order[k:k + 3]])
        real, processed = real + int(batch["attention_mask"].sum()), processed + batch["input_ids"].numel()
    assert report.padding == (real, processed, 2)
    text = format_report(report)
    assert f"packed into rows (dataset.pack_length={pack_length})" in text  # as the user writes it: null, 512
    assert f"{real} real of {processed} processed tokens" in text


# A custom record's id: its row, then (for a JSON file) where it is, e.g. "custom/train[0] (.../train.jsonl:1)".
_RECORD_0, _RECORD_2 = r"custom/train\[0\]( \([^)]*:1\))?: ", r"custom/train\[2\]( \([^)]*:3\))?"


def _custom(tmp_path: Path, with_video: bool, num_rows: int) -> Path:
    return get_spec("custom").write_fixture(tmp_path / "custom", num_rows=num_rows, with_video=with_video)


def _custom_overrides(path: Path, model: str = "tiny_gemma3", *extra: str) -> list:
    return [f"model={model}", "dataset=custom", f"dataset.path={path}", "dataset.val_split=null", "eval=none",
            "step_scheduler.global_batch_size=2", *extra]


def test_missing_image_is_a_one_line_error_naming_the_record_or_counted_under_skip(tmp_path):
    path = _custom(tmp_path, with_video=False, num_rows=8)
    (path.parent / "images" / "0_0.png").unlink()  # row 0's only image
    with pytest.raises(BadRecordError) as err:
        _preflight(_custom_overrides(path))
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert re.match(_RECORD_0, message) and "image not found" in message
    assert "dataset.on_bad_record=skip" in message

    report = _preflight(_custom_overrides(path, "tiny_gemma3", "dataset.on_bad_record=skip"))
    assert report.skipped == {"unreadable media": 1} and report.usable == 7
    assert re.match(_RECORD_0, report.skip_examples["unreadable media"])
    assert "unreadable media: 1" in format_report(report)


@pytest.mark.parametrize("model, outcome", [("tiny_gemma3", "no video"), ("tiny_qwen2_5_vl", "ok"),
                                            ("tiny_nemotron_vl", "one video conversation per call")])
def test_video_records_against_each_family(model, outcome, tmp_path):
    """Gemma 3 takes no video; Qwen batches videos; Nemotron's processor takes one video conversation per call
    (which bounds generation batches only: training encodes one record per call)."""
    path = _custom(tmp_path, with_video=True, num_rows=5)  # row 2 is the video row
    family = get_family(compose([f"model={model}"]).model.family)
    assert family.supports_video == (outcome != "no video")
    assert (family.video_conversations_per_call == 1) == (outcome == "one video conversation per call")
    micro_2 = _custom_overrides(path, model, "step_scheduler.micro_batch_size=2")
    micro_1 = _custom_overrides(path, model, "step_scheduler.micro_batch_size=1")
    if outcome == "no video":
        with pytest.raises(BadRecordError, match="^" + _RECORD_2 + r": has a video, but model family 'gemma3'"):
            _preflight(micro_1)
        report = _preflight(micro_1 + ["dataset.on_bad_record=skip"])  # training skips it too
        assert report.skipped == {"video for a model without video": 1} and report.usable == 4
        _, _, _, datasets, collator = _parts(micro_1 + ["dataset.on_bad_record=skip"])
        assert collator([datasets["train"][2]])["num_skipped"] == 1
        return
    if not family.images_with_videos:  # Nemotron's frames fill the image token: one record per micro batch
        with pytest.raises(ConfigError, match=r"^config error: step_scheduler.micro_batch_size=2, but custom mixes "
                                              r"image and video records and model family 'nemotron_vl'"):
            _preflight(micro_2)
        _, _, _, datasets, collator = _parts(micro_2)
        rows = [datasets["train"][i] for i in range(5)]
        assert media_kinds(rows[1].conversation) == {"image"} and media_kinds(rows[2].conversation) == {"video"}
        with pytest.raises(BadRecordError, match=r"\(images\) and .* \(video\) are in one micro-batch"):
            collator(rows[1:3])  # what a mixed training batch would hit, instead of a crash in the forward
    # Training encodes one record per processor call: any micro batch (of one kind, for Nemotron).
    report = _preflight(micro_2 if family.images_with_videos else micro_1)
    generating = micro_2 + ["eval.every_steps=1", "eval.batch_size=2"]
    if outcome == "ok":
        _preflight(generating)
    else:  # generation encodes its batch in one call
        with pytest.raises(ConfigError) as err:
            _preflight(generating)
        assert str(err.value).startswith("config error: eval.batch_size=2")
        assert re.search(_RECORD_2 + " has a video", str(err.value))
        assert "set eval.batch_size=1" in str(err.value)
    assert report.usable == 5 and report.records_by_media["video"] == 1
    cfg, _, _, datasets, collator = _parts(micro_1)
    ids = collator([datasets["train"][2]])["input_ids"]
    config = _model_config(cfg)
    video_tokens = int((ids == config.video_token_id).sum())  # Nemotron's video reuses the image token
    assert report.video_tokens == video_tokens
    assert report.image_tokens + report.video_tokens > 0


def test_over_long_records_are_counted_with_their_length_or_stop_the_run(receipts_dir):
    base = ["model=tiny_gemma3", "dataset.max_train_samples=8", "dataset.val_split=null", "eval=none"]
    lengths = _preflight(base).lengths
    limit = sorted(lengths)[5]
    over = [(f"synthetic_receipts/train[{i}]", n) for i, n in enumerate(lengths) if n > limit]
    assert 0 < len(over) < 4

    skip = base + [f"dataset.max_length={limit}", "dataset.on_bad_record=skip"]
    report = _preflight(skip)
    assert report.too_long == over and report.skipped == {"too long": len(over)}
    assert report.usable == 8 - len(over) and report.histogram()[-1] == (f">{limit}", len(over))
    assert f"{over[0][0]} {over[0][1]}" in format_report(report)
    # Padding as the run sees it: its collator drops the over-long records from their micro batch.
    cfg, _, _, datasets, collator = _parts(skip)
    train = datasets["train"]
    hints = train.length_hints() if cfg.dataset.group_by_length else None
    order = ShardedIndexSampler(8, seed=cfg.seed, lengths=hints, batch_size=2).epoch_order(0)
    masks = [collator([train[i] for i in order[k:k + 2]]).get("attention_mask") for k in range(0, 8, 2)]
    masks = [m for m in masks if m is not None]
    assert report.padding == (sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks), len(masks))

    with pytest.raises(BadRecordError) as err:
        _preflight(base + [f"dataset.max_length={limit}"])
    record, length = over[0]
    assert str(err.value).startswith(f"{record}: {length} tokens exceed dataset.max_length={limit}")


def test_a_bounded_sample_is_seeded_and_spread_over_the_split(receipts_dir):
    picked = sample_indices(1000, 64, seed=3)
    assert len(picked) == len(set(picked)) == 64 and picked == sorted(picked)
    assert picked[:32] == list(range(32)) and max(picked) > 500  # the head, then the rest of the split
    assert picked == sample_indices(1000, 64, seed=3) != sample_indices(1000, 64, seed=4)
    assert sample_indices(10, 64, seed=0) == sample_indices(10, None, seed=0) == list(range(10))
    report = _preflight(["model=tiny_gemma3", "dataset.max_val_samples=2"], sample_size=10)
    assert report.checked == {"train": 10, "validation": 2} and report.split_sizes["train"] == 64
    assert report.usable == 12 and report.padding[2] == 5  # the 10 sampled train records in micro batches of 2


def test_conf_dir_is_found_from_anywhere(tmp_path):
    assert find_conf_dir(ROOT / "src") == ROOT / "conf"
    assert find_conf_dir(tmp_path) == ROOT / "conf"  # not under the repository: next to the package


def _inspect(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_sweep.inspect", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_inspect_cli_prints_the_report_or_one_line_and_exits_2(tmp_path, receipts_dir):
    good = _inspect("dataset.max_train_samples=8", "dataset.max_val_samples=4", cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "checked    train 8 of 8, validation 4 of 4 records: 12 usable, 0 skipped" in good.stdout
    assert "padding" in good.stdout and "[[" in good.stdout

    path = _custom(tmp_path, with_video=False, num_rows=4)
    (path.parent / "images" / "0_0.png").unlink()
    bad = _inspect(*_custom_overrides(path))
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match("error: " + _RECORD_0, lines[0]) and "image not found" in lines[0]

    wrong_key = _inspect("dataset.max_lenght=3")
    assert wrong_key.returncode == 2 and "dataset.max_lenght" in wrong_key.stderr
    assert len(wrong_key.stderr.strip().splitlines()) == 1
