"""Load what training produced (or a hub model) for generation, evaluation and export.

Accepted sources, in the order they are recognised:
  * a run dir, a ``checkpoints/`` dir (LATEST is followed) or a ``step_<N>`` dir;
  * a model dir holding a PEFT adapter (adapter_config.json) — its base model is loaded
    through the same path training used (tiny bases are rebuilt if missing);
  * a full Hugging Face model dir (config.json), e.g. an export or a full fine-tune;
  * a hub model id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Tuple

from vlm_sweep.errors import CheckpointError
from vlm_sweep.hub import names_a_local_path
from vlm_sweep.models.load import load_model, load_processor, preflight_hub_access, resolve_source
from vlm_sweep.models.registry import family_for_model_type
from vlm_sweep.rundir import CheckpointDir, find_model_dir


@dataclass
class Loaded:
    """A model ready for inference, and where it came from (the CLIs report and reuse these)."""

    model: Any
    processor: Any
    family: str
    model_dir: str              # where the weights came from
    run_config: Optional[dict]  # the training config, when loading a checkpoint


def _model_cfg(family: str, source: str, run_config: Optional[dict], dtype: Optional[str]) -> Any:
    """The ``model`` config section training used (or a plain one for a hub model)."""
    base = dict(run_config["model"]) if run_config else {
        "family": family, "pretrained_model_name_or_path": source, "tiny_recipe": None,
        "revision": None, "dtype": "auto", "attn_implementation": None, "trust_remote_code": False}
    base["family"] = family
    if dtype:
        base["dtype"] = dtype
    return SimpleNamespace(**base)


def _read_run_config(step_dir: Optional[Path]) -> Optional[dict]:
    """The config a checkpoint was trained with (None for an export or a hub model)."""
    if step_dir is None or not CheckpointDir(step_dir).config.exists():
        return None
    import yaml

    return yaml.safe_load(CheckpointDir(step_dir).config.read_text())


def _load_adapter(model_dir: Path, run_config: Optional[dict], dtype: Optional[str],
                  merge_lora: bool) -> Tuple[Any, Any, str]:
    """(model, processor, family) for a PEFT adapter dir: its base loaded as training loaded it."""
    from peft import PeftModel

    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    if "base_model_name_or_path" not in adapter:
        raise CheckpointError(f"{model_dir / 'adapter_config.json'} names no base_model_name_or_path")
    if run_config:
        family = run_config["model"]["family"]
        base_cfg = _model_cfg(family, adapter["base_model_name_or_path"], run_config, dtype)
        base_source = resolve_source(base_cfg)
    else:
        base_source = adapter["base_model_name_or_path"]
        preflight_hub_access(base_source)
        family = _family_of(base_source)
        base_cfg = _model_cfg(family, base_source, None, dtype)
    model = PeftModel.from_pretrained(load_model(base_source, base_cfg), str(model_dir))
    if merge_lora:
        model = model.merge_and_unload()
    return model, load_processor(str(model_dir), base_cfg), family


def resolve_checkpoint(source: str) -> Tuple[Path, Optional[Path], Optional[dict]]:
    """(model dir, step dir or None, training config or None) for ``source``, without loading a model.

    The one place that decides a ``--checkpoint`` value is a missing path ("checkpoint not
    found") rather than a hub id (``hub.names_a_local_path``); every command goes through it.
    """
    model_dir, step_dir = find_model_dir(source)
    if not model_dir.exists() and names_a_local_path(source):
        raise CheckpointError(f"checkpoint not found: {source} (expected a run, checkpoints, step_<N>, "
                              f"model or export dir, or a hub id)")
    if model_dir.is_dir() and not any((model_dir / name).exists() for name in ("config.json", "adapter_config.json")):
        raise CheckpointError(f"no checkpoint or model in {source} (a run dir that has not saved a checkpoint yet, "
                              f"or a directory that is not a model)")
    return model_dir, step_dir, _read_run_config(step_dir)


def load_for_inference(source: str, *, merge_lora: bool = False, dtype: Optional[str] = None) -> Loaded:
    """Model (eval mode) + processor from any accepted source (see the module docstring)."""
    model_dir, step_dir, run_config = resolve_checkpoint(source)
    if (model_dir / "adapter_config.json").exists():
        model, processor, family = _load_adapter(model_dir, run_config, dtype, merge_lora)
    else:
        source_dir = str(model_dir) if model_dir.exists() else source
        preflight_hub_access(source_dir)
        family = run_config["model"]["family"] if run_config else _family_of(source_dir)
        cfg = _model_cfg(family, source_dir, run_config, dtype)
        model = load_model(source_dir, cfg)
        processor = load_processor(source_dir, cfg)
    model.eval()
    return Loaded(model=model, processor=processor, family=family, model_dir=str(model_dir),
                  run_config=run_config)


def _family_of(source: str) -> str:
    """The registry family of a model dir or hub id, from its config.json ``model_type``."""
    from transformers import AutoConfig

    return family_for_model_type(AutoConfig.from_pretrained(source).model_type)
