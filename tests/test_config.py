"""Config composition, typed schemas, value validation, the CLI's fast failure, output dirs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import ROOT, compose, run_launch
from vlm_sweep.config.validate import ConfigError, validate_config

CONF = ROOT / "conf"
# experiment/ and hparams_search/ are `# @package _global_` files (tested in test_experiments.py);
# hydra/ holds launcher profiles (tested in test_sweeps.py).
GLOBAL_GROUPS = {"experiment", "hparams_search", "hydra"}
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in GLOBAL_GROUPS)
OPTIONS = [(group, opt.stem) for group in GROUPS for opt in sorted((CONF / group).glob("*.yaml"))]
HEAVY = {"torch", "transformers", "mlflow"}


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """Validation counts processes from the environment; start every test as a single process."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def _compose_with_hydra(overrides, config_dir: Path = CONF):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vlm_sweep.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _heavy_imports(importtime_log: str) -> set:
    """Top-level packages among the modules listed by `python -X importtime`."""
    found = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            module = line.rsplit("|", 1)[1].strip()
            if module.split(".")[0] in HEAVY:
                found.add(module)
    return found


# ---------------------------------------------------------------- composition


def test_config_groups_are_all_in_the_defaults_list():
    defaults = OmegaConf.load(CONF / "config.yaml").defaults
    listed = {next(iter(d)) for d in defaults if isinstance(d, dict) or OmegaConf.is_dict(d)}
    assert set(GROUPS) <= listed, f"groups without a default: {set(GROUPS) - listed}"
    assert len(OPTIONS) >= len(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    # A data set that reads the user's own file needs its path (validation says so otherwise).
    own_file = OmegaConf.load(CONF / group / f"{option}.yaml")
    needs_path = group == "dataset" and "path" in own_file.keys() and OmegaConf.is_missing(own_file, "path")
    cfg = compose([f"{group}={option}"] + (["dataset.path=/data/mine.jsonl"] if needs_path else []))
    validate_config(cfg)
    # The option was really selected: the composed group carries the file's own values.
    own = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    own.pop("defaults", None)
    composed = OmegaConf.to_container(cfg[group], resolve=False)
    for key, value in own.items():
        if needs_path and key == "path":
            continue
        assert composed[key] == value, f"{group}={option}: {key}"
    # And everything resolves (interpolations such as ${paths.cache_dir} are valid).
    OmegaConf.to_container(cfg, resolve=True)


def test_default_config_validates_and_is_typed():
    from vlm_sweep.config.schema import OptimizerConfig, RunConfig

    cfg = compose()
    validate_config(cfg)
    assert OmegaConf.get_type(cfg) is RunConfig
    assert OmegaConf.get_type(cfg.optimizer) is OptimizerConfig
    assert cfg.experiment_name == f"{cfg.model.name}_{cfg.dataset.name}"
    assert cfg.tracking.experiment_name == cfg.experiment_name


@pytest.mark.parametrize("override,key", [
    ("optimizer.lrr=1", "optimizer.lrr"),        # misspelled key
    ("optimizer.lr=abc", "optimizer.lr"),        # wrong type
    ("model.dtyp=x", "model.dtyp"),              # misspelled key inside a group
    ("step_scheduler.max_steps=ten", "step_scheduler.max_steps"),
    ("peft.dim=1.5", "peft.dim"),
])
def test_bad_override_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    assert key in str(err.value)


def test_misspelled_key_in_a_group_yaml_fails_at_composition(tmp_path):
    """A user's own option file is merged into the schema too: a typo there is caught."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "my_model.yaml").write_text(
        "name: mine\nfamily: gemma3\npretrained_model_name_or_path: /models/mine\ndtyp: float32\n")
    with pytest.raises(ConfigCompositionException) as err:
        _compose_with_hydra(["model=my_model"], config_dir=conf)
    assert "dtyp" in str(err.value) and "model/my_model" in str(err.value)


def test_appending_an_unknown_key_with_plus_is_rejected():
    """Hydra's own error for `optimizer.lrr=1` says "use +optimizer.lrr=1"; following that hint
    must not silently run with the typo ignored."""
    with pytest.raises((ConfigCompositionException, ConfigError)) as err:
        validate_config(compose(["+optimizer.lrr=1"]))
    assert "lrr" in str(err.value)


def test_plus_adds_entries_to_free_form_dicts():
    cfg = compose(["+tracking.tags.team=vision", "+tracking.tags.ticket=42"])
    validate_config(cfg)
    assert dict(cfg.tracking.tags) == {"team": "vision", "ticket": "42"}


# ---------------------------------------------------------------- value validation


@pytest.mark.parametrize("overrides,key", [
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["step_scheduler.global_batch_size=5", "step_scheduler.micro_batch_size=2"],
     "step_scheduler.global_batch_size"),
    (["model.family=llama"], "model.family"),
    (["dataset.on_bad_record=maybe"], "dataset.on_bad_record"),
    (["peft.dropout=1.5"], "peft.dropout"),
    (["scheduler.min_lr=1.0", "optimizer.lr=1e-4"], "scheduler.min_lr"),
    (["optimizer.betas=[0.9,1.5]"], "optimizer.betas"),
    (["dataset.max_length=0"], "dataset.max_length"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["parallel.strategy=tpu"], "parallel.strategy"),
    (["tracking.backend=wandb"], "tracking.backend"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_impossible_values_raise_one_line_config_error_naming_the_key(overrides, key):
    cfg = compose(overrides)  # types are fine: composition succeeds
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith(f"config error: {key} ")
    assert "\n" not in message


def test_global_batch_must_divide_by_micro_batch_times_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    # 4 % (2 x 3) != 0
    with pytest.raises(ConfigError, match=r"^config error: step_scheduler\.global_batch_size .*2 x 3"):
        validate_config(compose(["parallel=ddp"]))
    # 6 = 1 accumulation step of 2 x 3, 12 = 2 steps: both fine.
    validate_config(compose(["parallel=ddp", "step_scheduler.global_batch_size=6"]))
    validate_config(compose(["parallel=ddp", "step_scheduler.global_batch_size=12"]))


@pytest.mark.parametrize("var", ["WORLD_SIZE", "SLURM_NTASKS"])
def test_single_strategy_with_several_processes_is_rejected(monkeypatch, var):
    monkeypatch.setenv(var, "2")
    with pytest.raises(ConfigError) as err:
        validate_config(compose(["parallel.strategy=single"]))
    assert str(err.value).startswith("config error: parallel.strategy ")
    assert "\n" not in str(err.value)
    validate_config(compose(["parallel=ddp"]))  # 4 % (2 x 2) == 0


def test_min_lr_equal_to_lr_is_allowed():
    validate_config(compose(["scheduler.min_lr=1e-4", "optimizer.lr=1e-4"]))


def test_bad_interpolation_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        validate_config(compose(["+tracking.tags.who=${oc.env:VLM_SWEEP_SURELY_UNSET_VAR}"]))
    assert "VLM_SWEEP_SURELY_UNSET_VAR" in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the real CLI


def test_cli_bad_value_fails_fast_before_any_model_loads(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    start = time.monotonic()
    proc = run_launch(["optimizer.lr=-1"], cwd=tmp_path,
                      env={"VLM_SWEEP_CACHE": str(cache), "PYTHONPROFILEIMPORTTIME": "1"}, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    messages = [line for line in proc.stderr.splitlines() if line and not line.startswith("import time:")]
    assert len(messages) == 1, proc.stderr[-2000:]
    assert "optimizer.lr" in messages[0]
    assert "Traceback" not in proc.stderr
    assert elapsed < 10
    assert list(cache.iterdir()) == [], "a model or data set was built before validation"
    assert not _heavy_imports(proc.stderr), "torch/transformers/mlflow imported before validation"


def test_cfg_job_prints_composed_yaml_without_heavy_imports(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "launch.py"), "--cfg", "job",
         "optimizer.lr=1e-5", "peft=none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "VLM_SWEEP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = OmegaConf.create(proc.stdout)
    assert printed.optimizer.lr == 1e-5
    assert printed.peft.method == "none"
    assert printed.model.name == "tiny_gemma3"
    assert "hydra" not in printed
    assert not _heavy_imports(proc.stderr)
    assert "import time:" in proc.stderr  # the log really was produced
    assert not (tmp_path / "outputs").exists(), "--cfg job must not start a run"
    assert not (tmp_path / "cache").exists()


def test_launch_compose_path_does_not_import_heavy_modules():
    code = f"""
import sys
import hydra
from omegaconf import DictConfig
from hydra import compose, initialize_config_dir
from vlm_sweep.config.schema import register_configs
register_configs()
with initialize_config_dir(config_dir={str(CONF)!r}, version_base="1.3"):
    cfg = compose(config_name="config", overrides=["model=qwen2_5_vl"], return_hydra_config=True)
assert cfg.model.family == "qwen2_5_vl"
print(sorted(m for m in sys.modules if m.split(".")[0] in {sorted(HEAVY)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------- output dirs


@pytest.mark.parametrize("overrides,experiment", [
    ([], "tiny_gemma3_synthetic_receipts"),
    (["model=tiny_qwen2_5_vl"], "tiny_qwen2_5_vl_synthetic_receipts"),
    (["experiment_name=my_study"], "my_study"),
])
def test_hydra_output_dirs_are_grouped_by_experiment(overrides, experiment):
    cfg = _compose_with_hydra(overrides)
    run_dir, sweep_dir = Path(cfg.hydra.run.dir), Path(cfg.hydra.sweep.dir)
    assert run_dir.parts[:2] == ("outputs", experiment)
    assert len(run_dir.parts) > 2  # timestamped below the experiment
    assert sweep_dir.parts[:3] == ("outputs", experiment, "multirun")
    assert len(sweep_dir.parts) > 3
    assert cfg.hydra.job.chdir is False


def test_output_root_moves_run_and_sweep_dirs(tmp_path):
    cfg = _compose_with_hydra([f"paths.output_root={tmp_path}"])
    assert Path(cfg.hydra.run.dir).is_relative_to(tmp_path / cfg.experiment_name)
    assert Path(cfg.hydra.sweep.dir).is_relative_to(tmp_path / cfg.experiment_name / "multirun")


@pytest.mark.parametrize("override,key", [("optimizer.lrr=1", "optimizer.lrr"), ("optimizer.lr=abc", "optimizer.lr"),
                                          ("model.dtyp=x", "model.dtyp"),
                                          ("step_scheduler.max_steps=ten", "step_scheduler.max_steps")])
def test_cli_wrong_key_or_type_is_one_line_naming_the_key(override, key, tmp_path):
    proc = run_launch([override], env={"VLM_SWEEP_CACHE": str(tmp_path / "cache")}, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and key in lines[0], proc.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv,overrides", [
    (["--cfg", "job", "model=tiny_qwen2_5_vl"], ["model=tiny_qwen2_5_vl"]),
    (["-c", "hydra", "-p", "model", "peft=lora"], ["peft=lora"]),
    (["--info", "defaults", "seed=1"], ["seed=1"]),
    (["--info", "seed=1"], ["seed=1"]),  # --info's value is optional
    (["-m", "optimizer.lr=1e-5,2e-5", "--config-name=config"], ["optimizer.lr=1e-5,2e-5"]),
])
def test_hydra_flags_and_their_values_are_not_taken_for_overrides(argv, overrides):
    from vlm_sweep.config.validate import command_line_overrides, override_syntax_problem

    assert command_line_overrides(argv) == overrides
    assert override_syntax_problem(command_line_overrides(argv)) is None
