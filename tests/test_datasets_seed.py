"""The seed data sets (MedPix-VQA, RAVEN, LLaVA-Video-178K, custom): loading from offline copies in
each hub schema, exact conversion, filtering and carving, video decoding, task metrics, and a
tiny-model run per data set that trains, resumes and generates."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from conftest import ROOT, compose
from vlm_sweep.config.validate import ConfigError, validate_config
from vlm_sweep.data import fixture_parts
from vlm_sweep.data.datasets import BadRecordError, ConversationDataset, build_datasets, carve_rows, load_split
from vlm_sweep.data.formats import assistant_texts
from vlm_sweep.data.sets import get_spec
from vlm_sweep.data.sets import llava_video_178k as llava_set, raven as raven_set
from vlm_sweep.data.sets.llava_video_178k import strip_placeholders
from vlm_sweep.data.media import MediaError, frame_indices, load_video_frames, shrink_image
from vlm_sweep.metrics.vqa import choice_scores, free_text_scores, option_letter, token_f1


# Throw-away data sets: their Arrow cache stays out of the user's HF cache.
pytestmark = pytest.mark.usefixtures("private_hf_datasets_cache")


@pytest.fixture(scope="module")
def medpix_dir(tmp_path_factory) -> Path:
    return get_spec("medpix_vqa").write_fixture(tmp_path_factory.mktemp("medpix"))


@pytest.fixture(scope="module")
def raven_dir(tmp_path_factory) -> Path:
    return get_spec("raven").write_fixture(tmp_path_factory.mktemp("raven"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return get_spec("llava_video_178k").write_fixture(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def custom_file(tmp_path_factory) -> Path:
    return get_spec("custom").write_fixture(tmp_path_factory.mktemp("custom"))


def _cfg(name: str, path: Path, *extra: str):
    return compose([f"dataset={name}", f"dataset.path={path}", *extra]).dataset


def _samples(dataset: ConversationDataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _parts(turn: dict, kind: str) -> list:
    return [part[kind] for part in turn["content"] if part["type"] == kind]


# ---------------------------------------------------------------- MedPix-VQA


def test_medpix_loads_from_a_local_copy_and_converts_exactly(medpix_dir):
    cfg = _cfg("medpix_vqa", medpix_dir)
    assert cfg.split == "validation"
    built = build_datasets(cfg)
    for role, count in (("train", 12), ("validation", 4)):
        source = pq.read_table(medpix_dir / "data" / f"{role}-00000-of-00001.parquet").to_pylist()
        samples = _samples(built[role])
        assert len(samples) == count
        for index, (sample, row) in enumerate(zip(samples, source)):
            assert sample.record_id == f"medpix_vqa/{role}[{index}]"
            user, assistant = sample.conversation
            (image,) = _parts(user, "image")
            assert (_pixels(image) == _pixels(PILImage.open(io.BytesIO(row["image_id"]["bytes"])))).all()
            assert _parts(user, "text") == [row["question"]]
            assert assistant_texts(sample.conversation) == [row["answer"]]


def test_max_image_side_shrinks_images_keeping_aspect(medpix_dir):
    cfg = _cfg("medpix_vqa", medpix_dir, "dataset.max_image_side=32")
    sample = ConversationDataset(load_split(cfg, "train"), cfg, "train")[0]
    (image,) = _parts(sample.conversation[0], "image")
    assert image.size == (32, 24)  # from 64 x 48
    small = PILImage.new("RGB", (20, 10))
    assert shrink_image(small, 32) is small and shrink_image(PILImage.new("RGB", (10, 300)), 30).size == (1, 30)


# ---------------------------------------------------------------- RAVEN (the_cauldron)


def _raven_rows(raven_dir: Path) -> list:
    return pq.read_table(raven_dir / "raven" / "train-00000-of-00001.parquet").to_pylist()


def _row_key(images: list) -> str:
    return hashlib.sha1(b"".join(_pixels(image).tobytes() for image in images)).hexdigest()


def test_raven_drops_incomplete_rows_and_counts_them(raven_dir, caplog):
    cfg = _cfg("raven", raven_dir, "dataset.carve_val_fraction=0.2")
    with caplog.at_level(logging.WARNING, logger="vlm_sweep.data.datasets"):
        built = build_datasets(cfg)
    kept = 24 - raven_set.INCOMPLETE_ROWS
    assert len(built["train"]) + len(built["validation"]) == kept
    assert len(built["validation"]) == round(kept * 0.2)
    assert f"raven/train: dropped {raven_set.INCOMPLETE_ROWS} of 24 rows" in caplog.text


def test_raven_turns_are_every_image_in_order_then_the_question(raven_dir):
    cfg = _cfg("raven", raven_dir, "dataset.carve_val_fraction=0.2")
    complete = _raven_rows(raven_dir)[: 24 - raven_set.INCOMPLETE_ROWS]
    train_rows, val_rows = carve_rows(len(complete), 0.2, seed=0)
    built = build_datasets(cfg)
    for role, rows in (("train", train_rows), ("validation", val_rows)):
        for sample, row_index in zip(_samples(built[role]), rows):
            row = complete[row_index]
            user, assistant = sample.conversation
            images = _parts(user, "image")
            assert len(images) == len(row["images"]) and len(images) >= 1
            for image, source in zip(images, row["images"]):  # same images, same order
                assert (_pixels(image) == _pixels(PILImage.open(io.BytesIO(source["bytes"])))).all()
            assert user["content"][-1] == {"type": "text", "text": row["texts"][0]["user"]}
            assert assistant_texts(sample.conversation) == [row["texts"][0]["assistant"]]


def test_carved_validation_is_deterministic_and_disjoint(raven_dir):
    cfg = _cfg("raven", raven_dir, "dataset.carve_val_fraction=0.25")
    keys = {}
    for attempt in range(2):
        built = build_datasets(cfg)
        keys[attempt] = {role: [_row_key(_parts(s.conversation[0], "image")) for s in _samples(built[role])]
                         for role in ("train", "validation")}
    assert keys[0] == keys[1], "the carve changed between loads"
    train, val = set(keys[0]["train"]), set(keys[0]["validation"])
    assert val and train and not train & val
    # load_split (what evaluation CLIs use) gives the very same rows.
    assert len(load_split(cfg, "validation")) == len(val)
    # The carve itself: disjoint, complete, seeded.
    a_train, a_val = carve_rows(100, 0.1, seed=0)
    assert sorted(a_train + a_val) == list(range(100)) and len(a_val) == 10
    assert carve_rows(100, 0.1, seed=0) == (a_train, a_val) and carve_rows(100, 0.1, seed=1)[1] != a_val


def test_carving_config_rules():
    with pytest.raises(ConfigError, match=r"dataset\.val_split"):
        validate_config(compose(["dataset=raven", "dataset.val_split=train"]))
    validate_config(compose(["dataset=raven", "dataset.val_split=null", "eval=none"]))  # no validation: nothing carved
    with pytest.raises(ConfigError, match=r"dataset\.max_pixels"):
        validate_config(compose(["dataset.min_pixels=1000", "dataset.max_pixels=10"]))


# ---------------------------------------------------------------- LLaVA-Video-178K


def _llava_records(llava_dir: Path) -> list:
    subset = llava_dir / llava_set.SUBSET
    return [r for kind in ("oe", "mc") for r in
            json.loads((subset / f"{llava_set.SUBSET}_{kind}_qa_processed.json").read_text())]


def test_llava_video_converts_turns_strips_markers_and_samples_frames(llava_dir):
    cfg = _cfg("llava_video_178k", llava_dir, "dataset.carve_val_fraction=null", "dataset.val_split=null",
               "dataset.num_frames=6")
    train = build_datasets(cfg)["train"]
    records = _llava_records(llava_dir)
    assert len(train) == len(records) == 8  # open_ended + multi_choice
    multi_turn = 0
    for sample, record in zip(_samples(train), records):
        turns = sample.conversation
        assert [t["role"] for t in turns] == [{"human": "user", "gpt": "assistant"}[c["from"]]
                                              for c in record["conversations"]]
        texts = [_parts(t, "text")[0] for t in turns]
        assert texts == [c["value"].replace("<image>\n", "").strip() for c in record["conversations"]]
        assert not any("<image>" in t or "<video>" in t for t in texts)
        videos = [_parts(t, "video") for t in turns]
        assert len(videos[0]) == 1 and not any(videos[1:]), "only the first human turn carries the video"
        frames = videos[0][0]
        assert len(frames) == 6 and frames[0].size == (64, 64)
        assert frames.metadata["total_num_frames"] == 16 and frames.metadata["fps"] == 8
        assert assistant_texts(turns) == [c["value"] for c in record["conversations"] if c["from"] == "gpt"]
        multi_turn += len(turns) == 4
    assert multi_turn == 2


def test_llava_fps_sampling_and_placeholder_stripping(llava_dir):
    cfg = _cfg("llava_video_178k", llava_dir, "dataset.fps=2")
    sample = ConversationDataset(load_split(cfg, "multi_choice"), cfg, "multi_choice")[0]
    (frames,) = _parts(sample.conversation[0], "video")
    assert frames.metadata["frames_indices"] == [0, 4, 8, 12]  # 16 frames at 8 fps, 2 per second
    assert strip_placeholders("<video>\nWhat?") == "What?"
    assert strip_placeholders("Look at <image> and <video>\nanswer") == "Look at and answer"


def test_missing_video_is_an_error_naming_the_path(llava_dir, tmp_path):
    import shutil

    copy = tmp_path / "llava"
    shutil.copytree(llava_dir, copy)
    missing = copy / llava_set.SUBSET / _llava_records(llava_dir)[0]["video"]
    missing.unlink()
    cfg = _cfg("llava_video_178k", copy)
    dataset = ConversationDataset(load_split(cfg, "open_ended"), cfg, "open_ended")
    with pytest.raises(BadRecordError) as err:
        dataset[0]
    assert "llava_video_178k/open_ended[0]" in str(err.value) and str(missing) in str(err.value)
    skipping = _cfg("llava_video_178k", copy, "dataset.on_bad_record=skip")
    assert ConversationDataset(load_split(skipping, "open_ended"), skipping, "open_ended")[0] is None
    # A relative path with nowhere to resolve it says which key to set.
    unrooted = _cfg("llava_video_178k", copy, "dataset.video_root_path=null")
    with pytest.raises(BadRecordError, match=r"dataset\.video_root_path"):
        ConversationDataset(load_split(unrooted, "open_ended"), unrooted, "open_ended")[1]


def test_seeking_decoder_returns_exactly_the_frames_a_full_decode_gives(tmp_path):
    import av

    path = fixture_parts.write_video(tmp_path / "clip.mp4", num_frames=40, seed=3)
    with av.open(str(path)) as container:
        every = [frame.to_image() for frame in container.decode(container.streams.video[0])]
    for num_frames in (1, 5, 40):
        frames = load_video_frames(path, num_frames=num_frames)
        assert frames.metadata["frames_indices"] == frame_indices(40, 8.0, num_frames, None)
        for frame, index in zip(frames, frames.metadata["frames_indices"]):
            assert (_pixels(frame) == _pixels(every[index])).all(), index
    with pytest.raises(MediaError, match="video not found"):
        load_video_frames(tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(MediaError, match=str(tmp_path / "bad.mp4")):
        load_video_frames(tmp_path / "bad.mp4")


# ---------------------------------------------------------------- custom


def test_custom_jsonl_with_images_video_system_and_multi_turn(custom_file):
    cfg = _cfg("custom", custom_file, "dataset.carve_val_fraction=null", "dataset.val_split=null",
               "dataset.num_frames=4")
    samples = _samples(build_datasets(cfg)["train"])
    rows = [json.loads(line) for line in custom_file.read_text().splitlines()]
    assert len(samples) == len(rows) == 12
    for sample, row in zip(samples, rows):
        assert [t["role"] for t in sample.conversation] == [m["role"] for m in row["messages"]]
        for turn, message in zip(sample.conversation, row["messages"]):
            assert [p["type"] for p in turn["content"]] == [p["type"] for p in message["content"]]
            for part, source in zip(turn["content"], message["content"]):
                if source["type"] == "image":
                    assert (_pixels(part["image"]) == _pixels(PILImage.open(custom_file.parent / source["image"]))).all()
                elif source["type"] == "video":
                    assert len(part["video"]) == 4
                else:
                    assert part["text"] == source["text"]
    kinds = {tuple(t["role"] for t in s.conversation) for s in samples}
    assert ("system", "user", "assistant", "user", "assistant") in kinds


def test_custom_directory_and_bad_media_path(custom_file, tmp_path):
    cfg = _cfg("custom", custom_file.parent)  # a directory: train.jsonl is its train split
    built = build_datasets(cfg)
    assert len(built["train"]) + len(built["validation"]) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": "missing.png"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}) + "\n")
    cfg = _cfg("custom", bad, "dataset.carve_val_fraction=null", "dataset.val_split=null")
    with pytest.raises(BadRecordError) as err:
        build_datasets(cfg)["train"][0]
    assert "custom/train[0]" in str(err.value) and str(tmp_path / "missing.png") in str(err.value)


# ---------------------------------------------------------------- task metrics


def test_free_text_metrics_on_hand_made_cases():
    assert free_text_scores(["The lesion."], ["lesion"]) == {"exact_match": 1.0, "token_f1": 1.0}
    assert token_f1("a large mass in the liver", "mass in liver") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert free_text_scores(["no", "left lung"], ["yes", "right lung"]) == pytest.approx(
        {"exact_match": 0.0, "token_f1": 0.25})
    assert get_spec("medpix_vqa").metric(["Axial CT"], ["axial ct"])["exact_match"] == 1.0


def test_choice_metrics_on_hand_made_cases():
    assert [option_letter(t) for t in ("B", "(C)", "D.", "E. a dog", "Answer: F", "I think the answer is G",
                                       "A man rides a bike")] == ["B", "C", "D", "E", "F", "G", None]
    raven = get_spec("raven").metric
    assert raven(["Answer: B", "C", "the answer is (D)", "nothing"], ["Answer: B", "Answer: D", "Answer: D",
                                                                        "Answer: A"]) == {"accuracy": 0.5}
    scores = choice_scores(["B", "c.", "The man runs", "a dog"], ["B.", "C. the ball", "the man runs.", "a cat"])
    assert scores == pytest.approx({"accuracy": 0.5, "mc_accuracy": 0.5, "open_exact_match": 0.5,
                                    "open_token_f1": 0.5})  # "c." is not an option letter


# ---------------------------------------------------------------- end to end

E2E = {  # data set -> (model, media given to the generate CLI)
    "medpix_vqa": ("tiny_gemma3", ["--image"]),
    "raven": ("tiny_gemma3", ["--image", "--image"]),
    "llava_video_178k": ("tiny_qwen2_5_vl", ["--video"]),
    "custom": ("tiny_qwen2_5_vl", ["--image", "--video"]),
}


def _media_args(kinds: list, tmp_path: Path) -> list:
    image = tmp_path / "probe.png"
    PILImage.new("RGB", (40, 30), (200, 40, 40)).save(image)
    video = fixture_parts.write_video(tmp_path / "probe.mp4")
    return [arg for kind in kinds for arg in (kind, str(image if kind == "--image" else video))]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(E2E))
def test_tiny_model_trains_resumes_and_generates(name, tmp_path):
    from vlm_sweep.train import run

    model, media = E2E[name]
    path = get_spec(name).write_fixture(tmp_path / "data")
    overrides = [f"model={model}", f"dataset={name}", f"dataset.path={path}", "tracking=none",
                 "step_scheduler.ckpt_every_steps=2", "step_scheduler.val_every_steps=2", "eval.every_steps=2",
                 "eval.num_samples=2", "eval.max_new_tokens=16", "dataset.max_val_samples=2",
                 "step_scheduler.global_batch_size=2", "step_scheduler.micro_batch_size=2"]
    if name in ("raven", "llava_video_178k"):
        overrides.append("dataset.carve_val_fraction=0.25")  # the tiny copies are too small for 2%
    run_dir = tmp_path / "run"
    first = run(compose(overrides + ["step_scheduler.max_steps=2"]), run_dir)
    assert first.status == "FINISHED" and first.step == 2
    resumed = run(compose(overrides + ["step_scheduler.max_steps=4"]), run_dir)
    assert resumed.status == "FINISHED" and resumed.step == 4
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_4"

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    task_metrics = {"medpix_vqa": "eval/token_f1", "raven": "eval/accuracy",
                    "llava_video_178k": "eval/accuracy", "custom": "eval/token_f1"}[name]
    for row in (rows[1], rows[3]):
        assert 0.0 <= row[task_metrics] <= 1.0 and row["val_loss"] > 0

    proc = subprocess.run([sys.executable, "-m", "vlm_sweep.generate", "--checkpoint-path", str(run_dir),
                           "--prompt", "What is shown?", "--max-new-tokens", "8", *_media_args(media, tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
