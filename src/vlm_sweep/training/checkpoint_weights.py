"""Trained weights stored once: read back from the checkpoint's model dir where it holds them.

A full fine-tune's ``model/`` dir already holds every weight, so the trained ones are not
written a second time to ``training_state/trainable.pt``. Instead
``training_state/weights_in_model.json`` maps each trained parameter to the file and key
that hold its exact bytes::

    {"model.language_model.norm.weight": ["model.safetensors", "language_model.model.norm.weight"]}

save_pretrained renames keys (and fuses some tensors) on the way to disk. The map is built
from the very tensors it writes: a parameter is mapped only when a saved tensor occupies its
memory (renamed, not converted), and only when the written file has that key with the same
shape and dtype. Whatever does not map (a fused q/k/v, a LoRA adapter, an FSDP shard) stays
in trainable.pt, so every trained weight is stored exactly once and restored bitwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from vlm_sweep.rundir import TRAINABLE, CheckpointDir

log = logging.getLogger(__name__)

_ST_INDEX = "model.safetensors.index.json"
_ST_SINGLE = "model.safetensors"
_BIN_SINGLE = "pytorch_model.bin"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _memory(t: torch.Tensor) -> Tuple:
    """Where a tensor's bytes are: equal for a parameter and the state-dict view of it."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _written_state(model: Any, save_format: str) -> Dict[str, torch.Tensor]:
    """The tensors save_model_dir writes for a full (non-PEFT) model, under the written names."""
    state = model.state_dict()
    if save_format != "safetensors":
        return state  # torch.save of the state dict as it is
    # save_pretrained: drop ignored keys and tied duplicates, then undo load-time renames.
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def _safetensors_files(model_dir: Path) -> List[str]:
    if (model_dir / _ST_INDEX).exists():
        weight_map = json.loads((model_dir / _ST_INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    return [_ST_SINGLE] if (model_dir / _ST_SINGLE).exists() else []


def _written_headers(model_dir: Path) -> Dict[str, Tuple[str, Optional[torch.dtype], Tuple]]:
    """key -> (file, dtype, shape) of the weights in a model dir, without reading the data."""
    out: Dict[str, Tuple[str, Optional[torch.dtype], Tuple]] = {}
    files = _safetensors_files(model_dir)
    if files:
        from safetensors import safe_open

        for name in files:
            with safe_open(str(model_dir / name), framework="pt") as fh:
                for key in fh.keys():
                    tensor_slice = fh.get_slice(key)
                    out[key] = (name, _ST_DTYPES.get(tensor_slice.get_dtype()), tuple(tensor_slice.get_shape()))
    elif (model_dir / _BIN_SINGLE).exists():
        state = torch.load(model_dir / _BIN_SINGLE, weights_only=True, mmap=True, map_location="cpu")
        out = {k: (_BIN_SINGLE, v.dtype, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out


def map_to_model_dir(model: Any, model_dir: Path, save_format: str, names: List[str]) -> Dict[str, List[str]]:
    """{parameter name: [file, key]} for the trained parameters ``model_dir`` holds verbatim.

    Call after save_model_dir wrote ``model_dir`` for a full (non-PEFT, unsharded) model.
    Returns {} when the mapping cannot be worked out (everything then goes to trainable.pt).
    """
    try:
        written = _written_state(model, save_format)
    except Exception as err:  # a transformers without these helpers: store the weights ourselves
        log.debug("trained weights kept in %s: %s", TRAINABLE, err)
        return {}
    by_memory = {_memory(t): key for key, t in written.items()
                 if isinstance(t, torch.Tensor) and t.numel() > 0}
    headers = _written_headers(model_dir)
    params = dict(model.named_parameters())
    mapping: Dict[str, List[str]] = {}
    for name in names:
        param = params[name]
        key = by_memory.get(_memory(param)) if param.numel() > 0 else None
        header = headers.get(key) if key is not None else None
        if header and header[1] == param.dtype and header[2] == tuple(param.shape):
            mapping[name] = [header[0], key]
    return mapping


def read_from_model_dir(model_dir: Path, mapping: Dict[str, List[str]]) -> Dict[str, torch.Tensor]:
    """The trained weights a ``map_to_model_dir`` mapping points at, as CPU tensors."""
    by_file: Dict[str, Dict[str, str]] = {}
    for name, (file, key) in mapping.items():
        by_file.setdefault(file, {})[name] = key
    out: Dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        path = model_dir / file
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as fh:
                out.update({name: fh.get_tensor(key) for name, key in keys.items()})
        else:
            state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
            out.update({name: state[key] for name, key in keys.items()})
    return out


def trained_weights(step_dir: Path) -> Dict[str, torch.Tensor]:
    """Every trained parameter of checkpoint ``step_dir``, by parameter name (CPU tensors).

    From trainable.pt and, for a full fine-tune, from the model dir (see module docstring).
    """
    ck = CheckpointDir(Path(step_dir))
    weights: Dict[str, torch.Tensor] = {}
    if ck.trainable.exists():
        weights.update(torch.load(ck.trainable, weights_only=True, map_location="cpu"))
    if ck.weights_map.exists():
        mapping = json.loads(ck.weights_map.read_text())
        weights.update(read_from_model_dir(ck.model, mapping))
    return weights
