"""Records are named by where they are in the SOURCE (file:line, or the source split's row), and a broken
JSONL line is one line naming its file and line (or skipped, named and counted)."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from conftest import compose
from vlm_sweep.data.sets import get_spec
from vlm_sweep.data.datasets import (BadRecordError, DatasetLoadError, build_datasets, carve_rows,
                                     load_split)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _row(answer: str, role: str = "assistant") -> str:
    return json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                                    {"role": role, "content": [{"type": "text", "text": answer}]}]})


def _custom(path: Path, lines: list, *extra: str):
    path.write_text("".join(line + "\n" for line in lines))
    return compose(["dataset=custom", f"dataset.path={path}", *extra]).dataset


def _line_of(record_id: str, path: Path) -> int:
    match = re.search(re.escape(str(path)) + r":(\d+)\)$", record_id)
    assert match, record_id
    return int(match.group(1))


def _all(dataset) -> list:
    out = []
    for i in range(len(dataset)):
        try:
            out.append(dataset[i])
        except BadRecordError as err:
            out.append(err)
    return out


def test_a_bad_record_after_carving_is_named_by_its_file_line(tmp_path):
    # 40 rows on 42 lines (two blank lines); the row on line 31 is bad (an unknown role).
    lines, bad_line = [], 31
    for number in range(1, 43):
        lines.append("" if number in (5, 17) else _row(f"answer {number}", "robot" if number == bad_line else
                                                       "assistant"))
    data = tmp_path / "train.jsonl"
    cfg = _custom(data, lines, "dataset.carve_val_fraction=0.25")
    bad_row = sum(1 for number in range(1, bad_line) if lines[number - 1])  # its row in the file: 28
    train_rows, val_rows = carve_rows(40, 0.25, seed=0)
    assert bad_row in train_rows and train_rows.index(bad_row) != bad_row, "pick a line that moves when carved"
    built = build_datasets(cfg)
    seen = set()
    for role in ("train", "validation"):
        for item in _all(built[role]):
            if isinstance(item, BadRecordError):
                message = str(item)
                assert f"custom/train[{bad_row}] ({data}:{bad_line})" in message and "robot" in message
                seen.add(bad_line)
                continue
            line = _line_of(item.record_id, data)
            assert item.conversation[-1]["content"][0]["text"] == f"answer {line}"  # the named line IS the row
            seen.add(line)
    assert seen == {n for n in range(1, 43) if n not in (5, 17)}
    # max_train_samples keeps the names too.
    limited = build_datasets(_custom(data, lines, "dataset.carve_val_fraction=0.25", "dataset.max_train_samples=3"))
    assert [s.record_id for s in _all(limited["train"])] == [s.record_id for s in _all(built["train"])[:3]]


def test_carved_and_filtered_hub_rows_are_named_by_their_source_row(tmp_path):
    root = get_spec("raven").write_fixture(tmp_path / "raven")
    parquet = root / "raven" / "train-00000-of-00001.parquet"
    table = pq.read_table(parquet)
    # Put an incomplete row (the fixture writes them last) first: every complete row moves when it is dropped.
    pq.write_table(table.take(pa.array([table.num_rows - 1] + list(range(table.num_rows - 1)))), parquet)
    source = pq.read_table(parquet).to_pylist()
    built = build_datasets(compose(["dataset=raven", f"dataset.path={root}",
                                    "dataset.carve_val_fraction=0.25"]).dataset)
    named = 0
    for role in ("train", "validation"):
        dataset = built[role]
        for index in range(len(dataset)):
            sample = dataset[index]
            row = int(re.fullmatch(r"raven/train\[(\d+)\]", sample.record_id).group(1))
            images = [p["image"] for p in sample.conversation[0]["content"] if p["type"] == "image"]
            expected = [PILImage.open(io.BytesIO(i["bytes"])).convert("RGB") for i in source[row]["images"]]
            assert [im.tobytes() for im in images] == [im.tobytes() for im in expected], sample.record_id
            named += row != index
    assert named > 0
    # The evaluation CLIs' load_split + select keep the names as well.
    cfg = compose(["dataset=raven", f"dataset.path={root}", "dataset.carve_val_fraction=0.25"]).dataset
    from vlm_sweep.data.datasets import ConversationDataset

    again = ConversationDataset(load_split(cfg, "validation").select(range(2)), cfg, "validation")
    assert [again[i].record_id for i in range(2)] == [built["validation"][i].record_id for i in range(2)]


def _garbage_file(tmp_path: Path) -> Path:
    """Line 3 has trailing garbage, line 5 is JSON but not an object."""
    data = tmp_path / "train.jsonl"
    lines = [_row("a"), _row("b"), '{"messages": []} trailing garbage', _row("d"), "[1, 2]", _row("f")]
    data.write_text("\n".join(lines) + "\n")
    return data


def test_a_jsonl_line_with_trailing_garbage_is_one_line_naming_file_and_line(tmp_path):
    data = _garbage_file(tmp_path)
    cfg = compose(["dataset=custom", f"dataset.path={data}", "dataset.on_bad_record=error"]).dataset
    with pytest.raises(DatasetLoadError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert "\n" not in message and f"{data}:3: invalid JSON" in message
    assert "1 more bad line" in message and "dataset.on_bad_record=skip" in message
    # A directory whose split file is broken names the file and line too.
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "train.jsonl").write_text(data.read_text())
    with pytest.raises(DatasetLoadError) as err:
        build_datasets(compose(["dataset=custom", f"dataset.path={directory}"]).dataset)
    assert "\n" not in str(err.value) and f"{directory / 'train.jsonl'}:3: invalid JSON" in str(err.value)


def test_skip_names_and_counts_bad_lines_and_loads_the_rest(tmp_path, caplog):
    data = _garbage_file(tmp_path)
    cfg = compose(["dataset=custom", f"dataset.path={data}", "dataset.on_bad_record=skip",
                   "dataset.carve_val_fraction=null", "dataset.val_split=null"]).dataset
    with caplog.at_level(logging.WARNING, logger="vlm_sweep.data.datasets"):
        train = build_datasets(cfg)["train"]
    assert f"skipping bad record {data}:3: invalid JSON" in caplog.text
    assert f"skipping bad record {data}:5: not a JSON object" in caplog.text
    assert "skipped 2 bad line(s)" in caplog.text
    samples = [train[i] for i in range(len(train))]
    assert [_line_of(s.record_id, data) for s in samples] == [1, 2, 4, 6]
    assert [s.conversation[-1]["content"][0]["text"] for s in samples] == ["a", "b", "d", "f"]


def test_a_json_array_file_names_each_record_by_its_line(tmp_path):
    data = tmp_path / "train.json"
    rows = [json.loads(_row(f"answer {i}")) for i in range(3)]
    data.write_text("[\n" + ",\n".join(json.dumps(r, indent=2) for r in rows) + "\n]\n")
    text_lines = data.read_text().splitlines()
    starts = [n for n, line in enumerate(text_lines, 1) if line == "{"]
    cfg = compose(["dataset=custom", f"dataset.path={data}", "dataset.carve_val_fraction=null",
                   "dataset.val_split=null"]).dataset
    train = build_datasets(cfg)["train"]
    assert [_line_of(train[i].record_id, data) for i in range(3)] == starts
    data.write_text(data.read_text().replace('"answer 1"', '"answer 1" oops'))
    with pytest.raises(DatasetLoadError, match=re.escape(f"{data}:") + r"\d+: invalid JSON"):
        build_datasets(cfg)


@pytest.mark.parametrize("path", ["/data/cord_v2", "./my_receipts", "data/train.jsonl", "runs/data/cord"])
def test_a_missing_local_data_path_is_named_as_missing_not_as_a_hub_id(tmp_path, path):
    """A typo in dataset.path must not send the user to `hf download /data/...` or a hub timeout."""
    cfg = compose(["dataset=custom", f"dataset.path={path}"]).dataset
    with pytest.raises(DatasetLoadError) as err:
        build_datasets(cfg)
    assert str(err.value) == f"dataset.path {path!r} does not exist (no such file or directory)"


def test_a_hub_data_set_offline_and_not_cached_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    cfg = compose(["dataset=cord_v2"]).dataset
    with pytest.raises(DatasetLoadError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert "\n" not in message and "naver-clova-ix/cord-v2" in message
    assert "hf download --repo-type dataset naver-clova-ix/cord-v2" in message and "dataset.path=DIR" in message


def test_an_unreadable_data_set_stops_the_run_before_the_model_loads(tmp_path, monkeypatch):
    """Loading a 12B model takes minutes: a wrong dataset.path must fail first."""
    import vlm_sweep.models.load as load
    from vlm_sweep.train import run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(load, "load_model", no_model)
    monkeypatch.setattr(load, "load_processor", no_model)
    cfg = compose(["dataset=custom", f"dataset.path={tmp_path / 'missing.jsonl'}", "tracking=none"])
    with pytest.raises(DatasetLoadError, match="does not exist"):
        run(cfg, tmp_path / "run")


def _split_dir(directory: Path, files: dict) -> Path:
    directory.mkdir()
    for name, lines in files.items():
        (directory / name).write_text("".join(line + "\n" for line in lines))
    return directory


def test_a_directory_validation_file_is_used_and_carving_only_without_one(tmp_path, caplog):
    train = [_row(f"t{i}") for i in range(18)]
    directory = _split_dir(tmp_path / "cust", {"train.jsonl": train, "validation.jsonl": [_row("v1"), _row("v2")]})
    with caplog.at_level(logging.INFO, logger="vlm_sweep.data.datasets"):
        built = build_datasets(compose(["dataset=custom", f"dataset.path={directory}"]).dataset)
    assert len(built["train"]) == 18 and len(built["validation"]) == 2
    assert [built["validation"][i].conversation[-1]["content"][0]["text"] for i in range(2)] == ["v1", "v2"]
    assert "validation is the source's own 'validation' split (2 rows), not carved" in caplog.text
    assert "rows carved from" not in caplog.text
    caplog.clear()
    (directory / "validation.jsonl").unlink()  # no validation file: 10% of train is carved, and the log says why
    with caplog.at_level(logging.INFO, logger="vlm_sweep.data.datasets"):
        built = build_datasets(compose(["dataset=custom", f"dataset.path={directory}"]).dataset)
    assert (len(built["train"]), len(built["validation"])) == (16, 2)
    assert "carved from 'train' (seed 0): the source has no 'validation' split" in caplog.text


@pytest.mark.parametrize("name", ["val.jsonl", "dev.jsonl", "eval.json"])
def test_a_misnamed_split_file_is_one_line_naming_it_and_the_expected_names(tmp_path, name):
    directory = _split_dir(tmp_path / "cust", {"train.jsonl": [_row("a"), _row("b")], name: [_row("v")]})
    with pytest.raises(DatasetLoadError) as err:
        build_datasets(compose(["dataset=custom", f"dataset.path={directory}"]).dataset)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{directory / name}: not a split file name")
    assert "validation.jsonl" in message and f"dataset.val_split={name.split('.')[0]}" in message
    # Named as the run's val_split, the same file is the validation split.
    built = build_datasets(compose(["dataset=custom", f"dataset.path={directory}",
                                    f"dataset.val_split={name.split('.')[0]}"]).dataset)
    assert len(built["validation"]) == 1 and len(built["train"]) == 2


def test_skip_drops_a_bad_line_of_a_directory_split_file_and_names_records_by_file_line(tmp_path, caplog):
    lines = [_row("a"), _row("b"), _row("c"), _row("d", role="bot"), _row("e"), "{not json", _row("f")]
    directory = _split_dir(tmp_path / "bad", {"train.jsonl": lines})
    data = directory / "train.jsonl"
    cfg = compose(["dataset=custom", f"dataset.path={directory}", "dataset.on_bad_record=skip",
                   "dataset.carve_val_fraction=null", "dataset.val_split=null"]).dataset
    with caplog.at_level(logging.WARNING):
        train = build_datasets(cfg)["train"]
    assert f"skipping bad record {data}:6: invalid JSON" in caplog.text and "skipped 1 bad line(s)" in caplog.text
    assert [train.record_id(i) for i in range(len(train))] == [
        f"custom/train[{row}] ({data}:{line})" for row, line in enumerate((1, 2, 3, 4, 5, 7))]
    with pytest.raises(BadRecordError, match=re.escape(f"custom/train[3] ({data}:4): messages[1] has unknown role")):
        train.build(3)


def test_rows_with_string_content_among_list_content_and_a_bad_line_load_under_skip(tmp_path, caplog):
    string_content = json.dumps({"messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "plain"}]})
    lines = [_row("a"), string_content, _row("c"), "{not json", _row("e")]
    data = tmp_path / "train.jsonl"
    with pytest.raises(DatasetLoadError, match=re.escape(f"{data}:4: invalid JSON")):
        build_datasets(_custom(data, lines, "dataset.carve_val_fraction=null", "dataset.val_split=null"))
    cfg = _custom(data, lines, "dataset.on_bad_record=skip", "dataset.carve_val_fraction=null",
                  "dataset.val_split=null")
    with caplog.at_level(logging.WARNING):
        train = build_datasets(cfg)["train"]
    assert f"skipping bad record {data}:4: invalid JSON" in caplog.text
    samples = [train[i] for i in range(len(train))]
    assert [_line_of(s.record_id, data) for s in samples] == [1, 2, 3, 5]
    assert [s.conversation[-1]["content"][0]["text"] for s in samples] == ["a", "plain", "c", "e"]


def test_records_of_a_directory_are_named_by_their_split_file_and_line(tmp_path):
    directory = _split_dir(tmp_path / "cust", {"train.jsonl": [_row("a"), _row("b"), "", _row("d", role="bot")],
                                               "validation.jsonl": [_row("v")]})
    built = build_datasets(compose(["dataset=custom", f"dataset.path={directory}",
                                    "dataset.carve_val_fraction=null"]).dataset)
    with pytest.raises(BadRecordError) as err:
        built["train"].build(2)
    assert str(err.value) == f"custom/train[2] ({directory / 'train.jsonl'}:4): messages[1] has unknown role 'bot'"
    assert built["validation"][0].record_id == f"custom/validation[0] ({directory / 'validation.jsonl'}:1)"


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_media_part_without_its_path_names_the_field(tmp_path, kind):
    good = _row("fine")
    bad = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                                {"type": kind, "path": "x.png"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]})
    built = build_datasets(_custom(tmp_path / "train.jsonl", [good, bad], "dataset.carve_val_fraction=null",
                                   "dataset.val_split=null"))
    with pytest.raises(BadRecordError, match=rf"custom/train\[1\].*messages\[0\]\.content\[1\]\.{kind} is missing "
                                             r"\(expected a file path, got None\)"):
        built["train"][1]
