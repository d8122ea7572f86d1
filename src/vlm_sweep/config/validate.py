"""Value checks that types alone cannot express, run before anything heavy loads.

Every failure is one line naming the offending key, e.g.
``config error: optimizer.lr must be > 0 (got -1e-05)``.
"""

from __future__ import annotations

from vlm_sweep.errors import ConfigError  # noqa: F401 (defined there, re-exported here)

import os
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf




def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config error: {key} {rule} (got {value!r})")


def _choice(cfg: DictConfig, key: str, choices: Iterable[Any]) -> None:
    choices = list(choices)
    value = OmegaConf.select(cfg, key)
    _check(value in choices, key, f"must be one of {choices}", value)


def _where(cfg: DictConfig, key: str, pred: Callable[[Any], bool], rule: str) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value is not None and pred(value), key, rule, value)


def world_size() -> int:
    """Processes in this job, from torchrun or SLURM, without importing torch."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(var)
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"config error: environment {var} must be a positive integer (got {value!r})")
            return int(value)
    return 1


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first impossible value. Resolves interpolations."""
    from omegaconf.errors import ConfigKeyError

    from vlm_sweep.config.schema import RunConfig

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    try:  # keys added with "+" bypass Hydra's struct check: check them against the schema
        OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
    except ConfigKeyError as err:
        raise ConfigError(f"config error: {err.full_key} is not a known key") from None
    try:
        OmegaConf.resolve(OmegaConf.create(plain))
    except Exception as err:  # interpolation errors name the key themselves
        raise ConfigError(f"config error: {str(err).splitlines()[0]}") from None

    _check_missing(cfg)
    _check_model_and_data(cfg)
    _check_training(cfg)
    _check_eval_and_tracking(cfg)


POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")


def _check_model_and_data(cfg: DictConfig) -> None:
    from vlm_sweep.data.sets import all_specs
    from vlm_sweep.models.registry import MODEL_FAMILIES

    positive, non_negative = POSITIVE, NON_NEGATIVE
    _choice(cfg, "model.family", sorted(MODEL_FAMILIES))
    _choice(cfg, "model.dtype", ["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"])
    _choice(cfg, "model.attn_implementation",
            [None, "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"])

    _choice(cfg, "dataset.format", sorted(all_specs()))
    _choice(cfg, "dataset.on_bad_record", ["error", "skip"])
    _where(cfg, "dataset.max_length", *positive)
    _where(cfg, "dataset.min_usable_fraction", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    if cfg.dataset.num_workers is not None:
        _where(cfg, "dataset.num_workers", *non_negative)
    _where(cfg, "dataset.preflight_samples", *non_negative)
    _where(cfg, "dataset.feature_cache_mb", *non_negative)
    for key in ("dataset.max_train_samples", "dataset.max_val_samples"):
        if OmegaConf.select(cfg, key) is not None:
            _where(cfg, key, *positive)

    if cfg.dataset.carve_val_fraction is not None:
        _where(cfg, "dataset.carve_val_fraction", lambda v: 0 < v < 1, "must be in (0, 1)")
        _check(cfg.dataset.val_split != cfg.dataset.train_split, "dataset.val_split",
               "must differ from dataset.train_split: it names the split carved out of it", cfg.dataset.val_split)
    _where(cfg, "dataset.num_frames", *positive)
    for key in ("dataset.fps", "dataset.min_pixels", "dataset.max_pixels", "dataset.max_image_side"):
        if OmegaConf.select(cfg, key) is not None:
            _where(cfg, key, *positive)
    if cfg.dataset.min_pixels is not None and cfg.dataset.max_pixels is not None:
        _where(cfg, "dataset.max_pixels", lambda v: v >= cfg.dataset.min_pixels, "must be >= dataset.min_pixels")
    _check_packing(cfg)


def _check_packing(cfg: DictConfig) -> None:
    """dataset.packing / dataset.pack_length, and whether the model family can pack exactly."""
    from vlm_sweep.models.registry import MODEL_FAMILIES

    _choice(cfg, "dataset.packing", [False, True])
    if cfg.dataset.pack_length is not None:
        _where(cfg, "dataset.pack_length", lambda v: v >= cfg.dataset.max_length,
               f"must be >= dataset.max_length={cfg.dataset.max_length} (a record up to max_length must fit a row)")
    refused = MODEL_FAMILIES[cfg.model.family].packing_refused if cfg.dataset.packing else None
    _check(refused is None, "dataset.packing", f"cannot be true for model family {cfg.model.family}: {refused}",
           cfg.dataset.packing)


def _check_training(cfg: DictConfig) -> None:
    """freeze, peft, parallel, checkpoint format, optimizer, scheduler and step cadences."""
    positive, non_negative = POSITIVE, NON_NEGATIVE
    tower, model = cfg.freeze.freeze_vision_tower, cfg.freeze.freeze_vision_model
    _check(tower is None or model is None or tower == model, "freeze.freeze_vision_model",
           "is another name for freeze.freeze_vision_tower and contradicts it", model)

    from vlm_sweep.training.peft_methods import PEFT_METHODS

    _choice(cfg, "peft.method", sorted(PEFT_METHODS))
    _where(cfg, "peft.dim", *positive)
    _where(cfg, "peft.alpha", *positive)
    _where(cfg, "peft.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)")

    _choice(cfg, "parallel.strategy", ["single", "ddp", "fsdp"])
    _choice(cfg, "parallel.mixed_precision", ["auto", "no", "fp32", "bf16", "fp16"])
    _choice(cfg, "parallel.backend", [None, "gloo", "nccl"])
    processes = world_size()
    if cfg.parallel.strategy == "single":
        _check(processes == 1, "parallel.strategy",
               f"is 'single' but {processes} processes were launched; use parallel=ddp or parallel=fsdp",
               cfg.parallel.strategy)

    _choice(cfg, "checkpoint.model_save_format", ["safetensors", "torch_save"])
    _where(cfg, "checkpoint.keep_last", lambda v: v >= 1, "must be >= 1")

    _choice(cfg, "optimizer.name", ["adamw"])
    _where(cfg, "optimizer.lr", *positive)
    _where(cfg, "optimizer.weight_decay", *non_negative)
    _where(cfg, "optimizer.eps", *positive)
    _where(cfg, "optimizer.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
           "must be two numbers in [0, 1)")
    if cfg.optimizer.max_grad_norm is not None:
        _where(cfg, "optimizer.max_grad_norm", *positive)

    _choice(cfg, "scheduler.name", ["cosine", "constant"])
    _where(cfg, "scheduler.warmup_steps", *non_negative)
    _where(cfg, "scheduler.min_lr", lambda v: 0 <= v <= cfg.optimizer.lr, "must be in [0, optimizer.lr]")

    steps = cfg.step_scheduler
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every_steps",
                "val_every_steps", "ckpt_every_steps"):
        _where(cfg, f"step_scheduler.{key}", *positive)
    if steps.max_val_batches is not None:
        _where(cfg, "step_scheduler.max_val_batches", *positive)
    per_step = steps.micro_batch_size * processes
    _check(steps.global_batch_size % per_step == 0, "step_scheduler.global_batch_size",
           f"must be divisible by micro_batch_size x processes = {steps.micro_batch_size} x {processes}",
           steps.global_batch_size)



def _check_eval_and_tracking(cfg: DictConfig) -> None:
    """Best-checkpoint metric, generation eval, tracking, seed and the sweep objective."""
    positive, non_negative = POSITIVE, NON_NEGATIVE
    _choice(cfg, "checkpoint.best_mode", ["max", "min"])
    best = cfg.checkpoint.best_metric
    if best is not None:
        _check(best == "val_loss" or best.startswith("eval/"), "checkpoint.best_metric",
               "must be 'val_loss' or 'eval/<metric>'", best)
        if best.startswith("eval/"):
            _check_eval_metric(cfg, "checkpoint.best_metric", best)
    if cfg.eval.every_steps is not None:
        _where(cfg, "eval.every_steps", *positive)
    for key in ("eval.num_samples", "eval.max_new_tokens", "eval.batch_size"):
        _where(cfg, key, *positive)
    needs_val = cfg.eval.every_steps is not None or best is not None
    _check(not needs_val or cfg.dataset.val_split is not None, "dataset.val_split",
           "must name a split when eval.every_steps or checkpoint.best_metric is set", cfg.dataset.val_split)

    _choice(cfg, "tracking.backend", ["mlflow", "none"])
    _check_no_credentials(OmegaConf.to_container(cfg, resolve=False))
    _where(cfg, "tracking.flush_every_steps", *positive)
    _where(cfg, "tracking.retry_every_s", *positive)
    if cfg.tracking.peak_tflops is not None:
        _where(cfg, "tracking.peak_tflops", *positive)
    _where(cfg, "seed", *non_negative)
    _choice(cfg, "objective_mode", ["min", "max"])
    objective = cfg.objective_metric
    _check(objective in ("loss", "val_loss") or objective.startswith("eval/"), "objective_metric",
           "must be 'loss', 'val_loss' or 'eval/<metric>'", objective)
    if objective.startswith("eval/"):
        _check_eval_metric(cfg, "objective_metric", objective)
        _check(cfg.eval.every_steps is not None or (best or "").startswith("eval/"), "objective_metric",
               "is a generation metric but nothing measures it: set eval.every_steps", objective)


def _check_missing(cfg: DictConfig) -> None:
    """A mandatory value (``???``) left unset: name the key and what to set."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if "hydra" in plain:
        del plain["hydra"]
    for key in sorted(OmegaConf.missing_keys(plain)):
        hint = {"dataset.path": f" (dataset={OmegaConf.select(cfg, 'dataset.name')} reads your data: "
                                "set dataset.path=/path/to/file.jsonl or a directory)"}.get(key, "")
        raise ConfigError(f"config error: {key} must be set{hint}")


def _check_eval_metric(cfg: DictConfig, key: str, metric: str) -> None:
    """``eval/<name>`` must be a metric the data set's task metric reports."""
    from vlm_sweep.data.sets import all_specs

    spec = all_specs().get(cfg.dataset.format)
    names = spec.metric_names if spec else ()
    _check(metric[len("eval/"):] in names, key,
           f"names no metric of dataset.format={cfg.dataset.format} (it reports "
           f"{', '.join('eval/' + n for n in names)})", metric)


def credentials_problem(key: str, value: Any) -> Optional[str]:
    """One-line refusal of a URI with credentials in any config value (they would reach disk,
    Hydra's own files, the console and the tracker)."""
    from vlm_sweep.tracking import CREDENTIALS_IN_URI_ERROR, uri_has_credentials

    if not isinstance(value, str) or not uri_has_credentials(value):
        return None
    if key == "tracking.uri":
        return CREDENTIALS_IN_URI_ERROR
    return (f"config error: {key} contains a URI with credentials; remove them (for MLflow set "
            f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)")


def _check_no_credentials(node: Any, prefix: str = "") -> None:
    """Every string in the config, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_credentials(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_no_credentials(v, f"{prefix}{i}.")
    else:
        problem = credentials_problem(prefix[:-1], node)
        if problem:
            raise ConfigError(problem)


def check_cli_overrides(args: List[str], conf_dir: Optional[Path] = None) -> Optional[str]:
    """One-line error for a command-line override whose key, type or group option is wrong.

    Hydra reports these itself, but over several lines (or a config dump); this runs first
    and names the key in one. ``+``/``~`` overrides, ``hydra.*`` and interpolations are left
    to Hydra. A credential inside ``tracking.uri`` is refused here, before Hydra writes the
    overrides into the run dir. Returns the message, or None when all is well.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra explains it
        return None
    for override in overrides:
        key = override.key_or_group
        try:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # interval() and other non-enumerable sweeps: Hydra checks them
            continue
        secret = next((p for p in (credentials_problem(key, v) for v in values) if p), None)
        if secret:
            return secret
        if override.is_add() or override.is_delete() or override.package or key.startswith("hydra"):
            continue
        check = _check_group_choice if "." not in key else _check_key_value
        for value in values:
            problem = check(key, value, conf_dir)
            if problem:
                return problem
    return None


def override_problem(overrides: List[str], conf_dir: Optional[Path] = None) -> Optional[str]:
    """One line for the first override that is not ``key=value`` or whose key, type or group option is
    wrong (what launch.py, evaluate and inspect check before Hydra composes); None when all are fine."""
    return override_syntax_problem(overrides) or check_cli_overrides(overrides, conf_dir=conf_dir)


# Hydra's command-line flags that take the next argument as their value (``--info`` only optionally).
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
_HYDRA_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def command_line_overrides(argv: List[str]) -> List[str]:
    """The overrides of a ``launch.py`` command line: Hydra's flags and their values left out."""
    overrides, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("-"):
            following = argv[i + 1] if i + 1 < len(argv) else ""
            skip_next = "=" not in arg and (arg in _HYDRA_VALUE_FLAGS or (
                arg in ("--info", "-i") and following in _HYDRA_INFO_VALUES))
            continue
        overrides.append(arg)
    return overrides


def override_syntax_problem(args: List[str]) -> Optional[str]:
    """One line for an argument that is not an override at all (a stray path, ``key`` without ``=``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            reason = f": {lines[1]}" if len(lines) > 1 and not lines[1].startswith("See ") else ""
            return f"config error: {arg!r} is not a key=value override (e.g. dataset.split=test){reason}"
    return None


def _check_group_choice(group: str, value: Any, conf_dir: Optional[Path]) -> Optional[str]:
    """``model=tiny_gemma``: the option must be a file of that config group."""
    folder = conf_dir / group if conf_dir is not None else None
    if folder is None or not folder.is_dir() or value is None or not isinstance(value, str):
        return None
    if (folder / f"{value}.yaml").exists():
        return None
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    return f"config error: {group}={value} is not an option of '{group}'; choose one of {', '.join(options)}"


def _check_key_value(key: str, value: Any, conf_dir: Optional[Path]) -> Optional[str]:
    """``optimizer.lr=abc``: the key must exist in the schema and the value fit its type."""
    from omegaconf.errors import OmegaConfBaseException

    from vlm_sweep.config.schema import RunConfig

    if isinstance(value, str) and "${" in value:
        return None
    try:
        OmegaConf.update(OmegaConf.structured(RunConfig), key, value, merge=True)
    except AssertionError:  # a key under a free-form section that defaults to None (dataset.synthetic.*): Hydra's call
        return None
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        if "not in" in reason or "Key '" in reason:
            return f"config error: {key} is not a known key ({reason})"
        return f"config error: {key}={value!r}: {reason}"
    return None
