"""Packed rows through layers that carry state along the sequence: a fresh state per conversation.

A Mamba mixer (causal conv1d + selective scan) reads a row as ONE sequence: in a packed row the conv
window and the scan state of one conversation would flow into the next. transformers keeps packed
sequences apart only in the fused kernels: mamba_ssm / causal_conv1d take ``seq_idx`` (the sequence
number of every token), which transformers hands from the model's keyword arguments down to the
mixer and its kernel calls. Its PyTorch path takes no boundaries (and refuses ``seq_idx``).

So a packed batch of a family with ``ModelFamily.packed_recurrent_modules`` carries ``seq_idx``
(int32, rows x length; the padding closing a row is a sequence of its own), and the forward of every
module of a named class is wrapped (once, at the first packed batch):

* no ``seq_idx`` (unpacked batches, generation): the module's own forward, as before;
* the class's kernel packages import (transformers then runs those kernels): ``seq_idx`` goes on
  to them, one call for the whole batch (GPU path; not testable on a CPU-only machine);
* otherwise: the module's own forward once per conversation of each row, each from a fresh state,
  i.e. the very computation of the conversation alone; the outputs are concatenated in place.
  Autograd runs through the slices, and activation checkpointing recomputes the same split (the
  checkpointed layer is re-run with the same keyword arguments, ``seq_idx`` included).
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

SEQ_IDX = "seq_idx"  # transformers' keyword for the sequence number of each token of a packed row
_UNPACKED = "_vlm_sweep_unpacked_forward"  # the module's forward before wrapping
_KERNELS = "_vlm_sweep_kernels_take_seq_idx"
_LAST: List[Any] = [None, None]  # (seq_idx, its segments): every wrapped layer of a forward reads the same


def sequence_index(layout: Sequence[Sequence[Tuple[int, Any]]], length: int, device: Any) -> torch.Tensor:
    """(rows, length) int32: the conversation number of each token (row padding: one more)."""
    rows = []
    for row in layout:
        ids = [torch.full((n,), i, dtype=torch.int32) for i, (n, _) in enumerate(row)]
        used = sum(n for n, _ in row)
        ids.append(torch.full((length - used,), len(row), dtype=torch.int32))
        rows.append(torch.cat(ids))
    return torch.stack(rows).to(device)


def kernels_take_seq_idx(packages: Sequence[str]) -> bool:
    """Whether every kernel package imports (as transformers resolves them; none named: no)."""
    if not packages:
        return False
    for name in packages:
        try:
            importlib.import_module(name)
        except Exception:  # a broken install: transformers falls back to its PyTorch path too
            return False
    return True


def install(model: torch.nn.Module, modules: Mapping[str, Sequence[str]]) -> int:
    """Wrap the forward of every submodule whose class (or a base class) is named in ``modules``
    (class name -> kernel packages that take ``seq_idx``); idempotent. The number of such modules."""
    found = 0
    for module in model.modules():
        bases = {cls.__name__ for cls in type(module).__mro__}
        name = next((n for n in modules if n in bases), None)
        if name is None:
            continue
        found += 1
        if _UNPACKED not in module.__dict__:
            setattr(module, _UNPACKED, module.forward)  # a hook's instance forward (accelerate) is kept
            setattr(module, _KERNELS, kernels_take_seq_idx(modules[name]))
            module.forward = types.MethodType(_per_conversation_forward, module)
    return found


def _segments(seq_idx: torch.Tensor) -> List[List[Tuple[int, int]]]:
    """Per row, the (start, end) of each run of one sequence number (one device sync per forward)."""
    if _LAST[0] is not seq_idx:
        out = []
        for row in seq_idx.tolist():
            starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]]
            out.append(list(zip(starts, starts[1:] + [len(row)])))
        _LAST[:] = [seq_idx, out]
    return _LAST[1]


def _cut(value: Any, shape: torch.Size, row: int, start: int, end: int) -> Any:
    """A per-token tensor (leading dims = the hidden states') cut to one segment; anything else as is."""
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == shape[:2]:
        return value[row:row + 1, start:end]
    return value


def _per_conversation_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any,
                              **kwargs: Any) -> torch.Tensor:
    """The wrapped forward (see the module docstring)."""
    forward = getattr(self, _UNPACKED)
    seq_idx = kwargs.pop(SEQ_IDX, None)
    if seq_idx is None:
        return forward(hidden_states, *args, **kwargs)
    if getattr(self, _KERNELS):
        return forward(hidden_states, *args, seq_idx=seq_idx, **kwargs)
    if any(_is_cache(v) for v in (*args, *kwargs.values())):
        raise ValueError(f"{type(self).__name__}: a packed batch cannot run with a cache (use_cache=False)")
    shape = hidden_states.shape
    rows = []
    for row, bounds in enumerate(_segments(seq_idx)):
        parts = []
        for start, end in bounds:
            part_args = [_cut(a, shape, row, start, end) for a in args]
            part_kwargs: Dict[str, Any] = {k: _cut(v, shape, row, start, end) for k, v in kwargs.items()}
            out = forward(hidden_states[row:row + 1, start:end], *part_args, **part_kwargs)
            if not torch.is_tensor(out):
                raise TypeError(f"{type(self).__name__} returns {type(out).__name__}, not a tensor: "
                                "it cannot be run per packed conversation")
            parts.append(out)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0)


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)
