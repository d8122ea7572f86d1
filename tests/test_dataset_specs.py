"""Every data set (one ``DatasetSpec`` per ``vlm_sweep.data.sets`` module) has a format, a metric and
a fixture; its fixture's rows convert to conversations, its metric reports what it declares, and a
tiny model trains on it. The fixture CLI writes any of them (cord_v2 in the hub's exact schema)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, compose
from vlm_sweep.config.validate import validate_config
from vlm_sweep.data.datasets import build_datasets
from vlm_sweep.data.formats import assistant_texts
from vlm_sweep.data.sets import DatasetSpec, all_specs, get_spec
from vlm_sweep.errors import UserError

NAMES = sorted(all_specs())


# Throw-away data sets: their Arrow cache stays out of the user's HF cache.
pytestmark = pytest.mark.usefixtures("private_hf_datasets_cache")


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fixtures")
    return {name: get_spec(name).write_fixture(root / name) for name in NAMES}


def _overrides(spec: DatasetSpec, path: Path) -> list:
    """What the fixture CLI tells a user to launch with (its launch args, dataset, path)."""
    return [*spec.launch_args, f"dataset={spec.name}", f"dataset.path={path}"]


def test_the_known_data_sets_are_discovered():
    assert {"cord_v2", "medpix_vqa", "raven", "llava_video_178k", "custom"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_data_set_has_a_yaml_a_format_a_metric_and_a_fixture(name):
    spec = get_spec(name)
    assert spec.name == name and callable(spec.to_conversation) and callable(spec.write_fixture)
    assert callable(spec.metric) and spec.metric_names
    group = yaml.safe_load((ROOT / "conf" / "dataset" / f"{name}.yaml").read_text())
    assert group["name"] == name and group["format"] == name


def test_every_dataset_yaml_names_a_known_format():
    for path in (ROOT / "conf" / "dataset").glob("*.yaml"):
        cfg = compose([f"dataset={path.stem}", "dataset.path=/somewhere"])
        assert cfg.dataset.format in NAMES, path


@pytest.mark.parametrize("name", NAMES)
def test_fixture_rows_convert_to_conversations_scored_by_the_metric(name, fixture_paths):
    spec = get_spec(name)
    cfg = compose(_overrides(spec, fixture_paths[name]))
    validate_config(cfg)
    built = build_datasets(cfg.dataset)
    samples = [split[i] for split in built.values() for i in range(len(split))]
    assert len(built["train"]) > 0 and all(sample is not None for sample in samples)
    references = []
    for sample in samples:
        user = next(turn for turn in sample.conversation if turn["role"] == "user")
        assert user["content"] and all(part["type"] in ("text", "image", "video") for part in user["content"])
        answers = assistant_texts(sample.conversation)
        assert answers and all(answer.strip() for answer in answers)
        references.append(answers[-1])
    scores = spec.metric(references, references)
    assert set(scores) == set(spec.metric_names)
    assert scores[spec.metric_names[0]] == 1.0  # the headline metric: a perfect prediction scores 1


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_model_trains_on_every_fixture(name, fixture_paths, tmp_path):
    from vlm_sweep.train import run

    spec = get_spec(name)
    overrides = _overrides(spec, fixture_paths[name]) + [
        "tracking=none", "step_scheduler.max_steps=2", "step_scheduler.global_batch_size=2",
        "step_scheduler.micro_batch_size=1", "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=2",
        "dataset.max_val_samples=1", "eval.every_steps=2", "eval.num_samples=1", "eval.max_new_tokens=4"]
    result = run(compose(overrides), tmp_path)
    assert result.status == "FINISHED" and result.step == 2 and result.val_loss is not None
    logged = {key[len("eval/"):] for key in result.metrics if key.startswith("eval/")}
    assert spec.metric_names[0] in logged and logged <= set(spec.metric_names)  # only declared names


def test_an_unknown_data_set_is_one_line_naming_the_key_and_the_known_ones():
    with pytest.raises(UserError) as err:
        get_spec("cord_v3")
    message = str(err.value)
    assert "\n" not in message and "dataset.format='cord_v3'" in message
    assert all(name in message for name in NAMES)


def _fixtures_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_sweep.data.fixtures", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_fixture_cli_writes_cord_v2_in_the_hub_schema(tmp_path):
    import datasets

    proc = _fixtures_cli("cord_v2", str(tmp_path / "cord"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"dataset=cord_v2 dataset.path={(tmp_path / 'cord').resolve()}" in proc.stdout
    for split in ("train", "validation", "test"):
        loaded = datasets.load_dataset(str(tmp_path / "cord"), split=split)
        assert loaded.features == datasets.Features({"image": datasets.Image(),
                                                     "ground_truth": datasets.Value("string")})
        truth = json.loads(loaded[0]["ground_truth"])
        assert {"gt_parse", "meta", "valid_line"} <= set(truth) and truth["meta"]["split"] == split
        assert {"menu", "sub_total", "total"} <= set(truth["gt_parse"])


def test_fixture_cli_refuses_an_unknown_name_in_one_line_listing_the_known_ones(tmp_path):
    proc = _fixtures_cli("cord_v3", str(tmp_path / "x"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1
    assert "cord_v3" in lines[0] and all(name in lines[0] for name in NAMES)
    assert not (tmp_path / "x").exists()
