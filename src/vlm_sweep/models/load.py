"""Load a model and its processor the way a hub model is loaded.

A tiny model is first built once into a local directory (like a download), then
loaded through the very same ``from_pretrained`` calls as ``google/gemma-3-4b-it``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple

from vlm_sweep.errors import ModelLoadError  # noqa: F401 (defined there, re-exported here)
from vlm_sweep.hub import download_hint, hub_offline, hub_reachable
from vlm_sweep.models.registry import get_family, tiny_model_configs


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_source(model_cfg: Any) -> str:
    """Return the directory or hub id to load, building a tiny model first if configured."""
    source = str(model_cfg.pretrained_model_name_or_path)
    if model_cfg.tiny_recipe:
        from vlm_sweep.models.tiny import build_tiny_model

        build_tiny_model(model_cfg.tiny_recipe, source)
    return source


def preflight_hub_access(source: str, revision: str | None = None) -> None:
    """Fail fast, in one clear line, when a hub model is neither cached nor reachable.

    Without this, transformers retries for ~25 s and ends in a long traceback.
    """
    if Path(source).exists():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    offline = hub_offline()
    if offline or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is not reachable"
        raise ModelLoadError(
            f"model {source!r} is not in the local cache and {why}: {download_hint(source, revision=revision)}; or point "
            f"HF_HOME at a cache that has it, or use a tiny model (model={' | '.join(tiny_model_configs())})."
        )


def torch_dtype(name: str) -> Any:
    """Map a config dtype string to a torch dtype ("auto" stays "auto")."""
    import torch

    if name == "auto":
        return "auto"
    return getattr(torch, _DTYPES[name])


def load_processor(source: str, model_cfg: Any) -> Any:
    """AutoProcessor, asserting the family's real processor class came back."""
    from transformers import AutoProcessor

    family = get_family(model_cfg.family)
    processor = AutoProcessor.from_pretrained(
        source,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        **family.processor_kwargs,
    )
    if type(processor).__name__ != family.processor_class:
        raise ModelLoadError(
            f"AutoProcessor for {source!r} returned {type(processor).__name__}, expected "
            f"{family.processor_class} (model.family={model_cfg.family}); the processor "
            f"files (preprocessor_config.json, processor_config.json) are missing or broken."
        )
    return processor


def resolve_attention(setting: Optional[str]) -> Optional[str]:
    """``auto``: FlashAttention 2 on a CUDA device where the ``flash_attn`` extra is installed, else SDPA."""
    if setting != "auto":
        return setting
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_config(source: str, model_cfg: Any) -> Any:
    """The model's transformers config (config.json only: no weights read)."""
    import transformers

    return transformers.AutoConfig.from_pretrained(source, revision=model_cfg.revision,
                                                   trust_remote_code=model_cfg.trust_remote_code)


def language_hidden_size(config: Any) -> Optional[int]:
    """Hidden size of a model config's language model (the text config of a VLM), None if it has none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    return size if isinstance(size, int) else None


def language_width(source: str, model_cfg: Any) -> Optional[int]:
    """The language model's hidden size from its config, None where the config cannot be read here
    (the model load that follows reports why)."""
    try:
        return language_hidden_size(model_config(source, model_cfg))
    except Exception:  # noqa: BLE001 - best effort, as weightless_model
        return None


def weightless_model(source: str, model_cfg: Any) -> Optional[Any]:
    """The model's modules and parameter names on the meta device (no weights read, no memory), from its
    config alone; None where that cannot be built ahead of the real load (which then reports why)."""
    import torch
    import transformers

    family = get_family(model_cfg.family)
    try:
        config = model_config(source, model_cfg)
        with torch.device("meta"):
            return getattr(transformers, family.auto_model_class).from_config(
                config, trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - best effort: the real load below raises the error that matters
        return None


def load_model(source: str, model_cfg: Any) -> Any:
    """The model through the family's Auto class, with dtype and attention from config."""
    import transformers

    family = get_family(model_cfg.family)
    auto_cls = getattr(transformers, family.auto_model_class)
    kwargs = {}
    attention = resolve_attention(model_cfg.attn_implementation)
    if attention:
        kwargs["attn_implementation"] = attention
    return auto_cls.from_pretrained(
        source,
        revision=model_cfg.revision,
        dtype=torch_dtype(model_cfg.dtype),
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )


def checked_source(model_cfg: Any) -> str:
    """The model's local dir or hub id: a tiny model built, a hub model known to be loadable (one line if not)."""
    source = resolve_source(model_cfg)
    preflight_hub_access(source, model_cfg.revision)
    return source


def load_model_and_processor(model_cfg: Any, source: Optional[str] = None) -> Tuple[Any, Any]:
    """Processor and model from ``source`` (default: ``checked_source(model_cfg)``)."""
    source = source or checked_source(model_cfg)
    try:
        processor = load_processor(source, model_cfg)
        model = load_model(source, model_cfg)
    except OSError as err:  # transformers reports missing files/repos as OSError
        raise ModelLoadError(f"could not load model {source!r}: {str(err).splitlines()[0]}") from err
    return model, processor
