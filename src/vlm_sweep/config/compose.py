"""The run config composed outside ``launch.py``: from the conf/ shipped with the package.

Commands that score or inspect a checkpoint compose the same config tree a run uses, and
default the data set to the one the checkpoint was trained on (with its settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional


def _overridden_keys(overrides: List[str], prefix: str) -> List[str]:
    """Keys under ``prefix.`` that the command line sets (``dataset.split=test`` -> ``split``)."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o or o.startswith("~")]
    return [k[len(prefix) + 1:] for k in keys if k.startswith(f"{prefix}.")]


def with_run_dataset(cfg: Any, overrides: List[str], run_config: Optional[dict]) -> Any:
    """``cfg`` whose data set settings are the run's (path, format, pixel budget, ...).

    A run trained on ``dataset.path=DIR`` is evaluated on DIR, not on the hub id its dataset
    config names. ``dataset=<name>`` on the command line picks another data set (nothing is
    reused); ``dataset.<key>=...`` overrides win over the run's value for that key.
    """
    from omegaconf import OmegaConf, open_dict

    if not run_config or "dataset" not in run_config or any(o.startswith("dataset=") for o in overrides):
        return cfg
    known = set(cfg.dataset.keys())
    run_dataset = OmegaConf.create({k: v for k, v in run_config["dataset"].items() if k in known})
    with open_dict(cfg.dataset):  # the run's dataset may hold keys its experiment added (dataset.synthetic.*)
        merged = OmegaConf.merge(cfg.dataset, run_dataset)
    OmegaConf.set_struct(merged, True)
    for key in _overridden_keys(overrides, "dataset"):  # the command line's value, as Hydra composed it
        with open_dict(merged):
            OmegaConf.update(merged, key, OmegaConf.select(cfg.dataset, key), merge=False)
    cfg.dataset = merged
    return cfg


def check_overrides(overrides: List[str], conf: Path) -> None:
    """Raise ConfigError (one line naming the key) for an override that is not ``key=value`` or whose
    key, type or group option is wrong: the same checks ``launch.py`` runs before Hydra composes."""
    from vlm_sweep.config.validate import override_problem
    from vlm_sweep.errors import ConfigError

    problem = override_problem(overrides, conf_dir=conf)
    if problem:
        raise ConfigError(problem)


def compose_eval_config(overrides: List[str], run_config: Optional[dict]) -> Any:
    """The composed config; the data set defaults to the checkpoint's own, with its settings.

    A wrong override raises ConfigError (one line) before anything is composed; what Hydra still
    refuses is re-raised as ConfigError with Hydra's first line.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from vlm_sweep.config.paths import conf_dir
    from vlm_sweep.config.schema import register_configs
    from vlm_sweep.errors import ConfigError

    conf = conf_dir()
    check_overrides(overrides, conf)
    composed = list(overrides)
    if run_config and not any(o.startswith("dataset=") for o in overrides):
        name = run_config["dataset"]["name"]
        if (conf / "dataset" / f"{name}.yaml").exists():
            composed = [f"dataset={name}", *overrides]
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=composed)
    except HydraException as err:
        raise ConfigError(f"config error: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return with_run_dataset(cfg, overrides, run_config)
