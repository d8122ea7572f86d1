"""FLOPs and model FLOPs utilisation (MFU) of VLM training steps, vision tower included.

MFU reports for VLMs usually count only the language model; on image-heavy batches the vision
tower (hundreds of patches per image) is a large share of the work. Here every registry component
is counted, by measuring with forward hooks (installed once) what ran in each micro-batch:

* Matmuls: each ``nn.Linear``/``nn.ConvNd`` that runs (LoRA's ``lora_A``/``lora_B`` are Linears of
  their own), and each raw 2-D weight mapping its module's input to its output features (Gemma 3's
  projector), adds ``F = 2 x weight_params x rows``, rows = the positions it produced. Per-module
  rows get the parts that run at their own token counts right: the projector at image tokens, a
  merger at patches/4, the LM head at the labelled rows only (``logits_to_keep``); weights that
  never run (a video patch projection on images) count nothing. Fused mixture-of-experts weights
  (3-D: experts x out x in) add ``2 x per-expert params x routed (token, expert) pairs``. An ``out_proj`` a fused kernel
  applies by weight (Mamba's training kernel) is counted when its parent ran. Embedding lookups,
  norms and activations are not counted.
* Attention scores: each module holding attention (a direct ``q_proj``-like Linear; Mamba mixers
  have none, so in hybrid LMs only attention layers count) adds ``A = 4 x width x sum(seq_len^2)``
  (QK^T and AV), width = query out_features (heads x head_dim), one sequence per image/window
  for packed vision inputs (``cu_seqlens``), per batch row otherwise; full s^2 as a dense kernel
  computes it (causal/sliding-window masks not discounted). Mamba2 mixers add their SSD scan,
  ``tokens x (2QGN + 2Q d_in + 4N d_in)`` (Q chunk, G groups, N state size).
* Backward, only where autograd works, read from ``requires_grad`` at run time: activation grads
  cost ``F`` per matmul whose input requires grad (a frozen vision tower with nothing trainable
  before it: none), weight grads ``F`` per trainable weight, attention/scan ``2 x A`` where their
  inputs or weights need grads. Full fine-tuning thus gives 6 x params x tokens.
* Not counted: activation-checkpoint recompute (hooks firing inside the backward; this is MFU,
  not hardware FLOPs utilisation) and forwards without grad mode (validation, generation).

Tokens: rows processed per component (its widest matmul's rows per forward), and the LM input
split into image/video tokens (positions holding the config's image/video token ids, else the
projector's output rows), text tokens and padding. Padding rows are computed, so they are in the
FLOPs; ``pad_tokens`` shows how much of the work they were.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from vlm_sweep.models.registry import COMPONENT_ORDER, ModelFamily, component_of, get_family

OTHER = "other"  # modules no registry component claims
MEDIA_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
Q_NAMES = ("q_proj", "query", "q", "wq", "q_lin", "to_q")
QKV_NAMES = ("qkv", "qkv_proj", "Wqkv", "c_attn", "query_key_value")  # not "in_proj": Mamba mixers have one
OUT_NAMES = ("out_proj", "o_proj")  # output projections a fused kernel may apply without calling them
SSM_ATTRS = ("num_heads", "head_dim", "ssm_state_size", "n_groups", "chunk_size")  # Mamba2-style mixers
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)



_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _ignored() -> bool:
    """Forwards that are no training work to count: no-grad ones (validation, generation) and
    activation-checkpoint recompute (it runs inside autograd's engine)."""
    return not torch.is_grad_enabled() or _graph_task_id() != -1


def _unwrap(model: Any) -> nn.Module:
    """The transformers model under DDP/FSDP1 (``.module``) and PEFT (``get_base_model``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _first_tensor(args: tuple, kwargs: Dict[str, Any], *names: str) -> Optional[torch.Tensor]:
    if args and torch.is_tensor(args[0]):
        return args[0]
    for name in names:
        if torch.is_tensor(kwargs.get(name)):
            return kwargs[name]
    return None


def _output_tensor(output: Any) -> Optional[torch.Tensor]:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return getattr(output, "last_hidden_state", None)


def _attention_width(module: nn.Module) -> Optional[int]:
    """Query width (heads x head_dim) of a module that directly holds attention projections."""
    children = dict(module.named_children())
    for name in Q_NAMES:
        if name in children and getattr(children[name], "out_features", None):
            return int(children[name].out_features)
    for name in QKV_NAMES:
        out = getattr(children.get(name), "out_features", None)
        if out:
            heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
            head_dim = getattr(module, "head_dim", None)
            return int(heads * head_dim) if heads and head_dim else int(out) // 3
    return None


Number = Union[int, float, torch.Tensor]  # device tensors stay lazy until tally(): no sync per forward


def _materialise(values: List[Number]) -> List[float]:
    """Python floats of a mix of numbers and device scalars, with one device sync."""
    tensors = [v for v in values if torch.is_tensor(v)]
    if not tensors:
        return [float(v) for v in values]
    resolved = iter(torch.stack([t.detach().to(tensors[0].device, torch.float64) for t in tensors]).tolist())
    return [next(resolved) if torch.is_tensor(v) else float(v) for v in values]


@dataclass
class StepTally:
    """What one rank's forwards/backwards cost since the last reset."""

    forward_flops: Dict[str, float] = field(default_factory=dict)   # component -> FLOPs
    backward_flops: Dict[str, float] = field(default_factory=dict)  # component -> FLOPs
    rows: Dict[str, int] = field(default_factory=dict)              # component -> tokens processed
    image_tokens: int = 0  # LM input positions holding image/video tokens
    text_tokens: int = 0   # the other non-padding positions
    pad_tokens: int = 0

    @property
    def flops(self) -> float:
        """Training FLOPs: forward plus backward, all components."""
        return sum(self.forward_flops.values()) + sum(self.backward_flops.values())

    def metrics(self) -> Dict[str, float]:
        """Flat numbers to log (after ``summed`` for values over all ranks)."""
        out = {"flops": self.flops, "image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
               "pad_tokens": self.pad_tokens, "vision_patches": self.rows.get("vision_tower", 0)}
        if self.flops:
            vision = sum(d.get(c, 0.0) for d in (self.forward_flops, self.backward_flops)
                         for c in ("vision_tower", "vision_projection"))
            out["vision_flops_fraction"] = vision / self.flops
        return out

    def _vector(self, comps: Sequence[str]) -> List[Number]:
        return ([self.forward_flops.get(c, 0.0) for c in comps] + [self.backward_flops.get(c, 0.0) for c in comps]
                + [self.rows.get(c, 0) for c in comps] + [self.image_tokens, self.text_tokens, self.pad_tokens])

    @classmethod
    def _from_vector(cls, comps: Sequence[str], values: List[float]) -> "StepTally":
        n = len(comps)
        part = lambda i, cast=float: {c: cast(v) for c, v in zip(comps, values[i * n:(i + 1) * n]) if v}  # noqa: E731
        image, text, pad = (int(round(v)) for v in values[3 * n:])
        return cls(part(0), part(1), part(2, lambda v: int(round(v))), image, text, pad)

    def summed(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> "StepTally":
        """Sum over ranks with ONE collective: ``reduce`` gets a float64 CPU vector, returns its sum."""
        comps = (*COMPONENT_ORDER, OTHER)
        total = reduce(torch.tensor(_materialise(self._vector(comps)), dtype=torch.float64))
        return StepTally._from_vector(comps, total.detach().cpu().double().tolist())


class FlopCounter:
    """Hooks a (PEFT/DDP-wrapped) VLM once. Counts accumulate until ``reset()``; ``tally()`` reads
    them (one device sync), so a trainer resets when a log window opens and tallies when it logs."""

    def __init__(self, model: Any, family: Union[ModelFamily, str],
                 media_token_ids: Optional[Iterable[int]] = None) -> None:
        self.family = get_family(family) if isinstance(family, str) else family
        self.model = _unwrap(model)
        if media_token_ids is None:
            config = getattr(self.model, "config", None)
            media_token_ids = {v for v in (getattr(config, a, None) for a in MEDIA_TOKEN_ATTRS) if type(v) is int}
        self.media_token_ids = sorted(int(i) for i in media_token_ids)
        self._handles: List[Any] = []
        self._depth = 0
        self._frame: Dict[str, int] = defaultdict(int)  # component -> rows in the current forward
        self._images_from_projector = False
        # The next forward's real (non-padding) token mask, for a batch whose attention_mask the model
        # gets as per-layer masks (block masks of packed or media-overlay batches): set by the trainer.
        self.real_tokens_mask: Optional[torch.Tensor] = None
        self.reset()
        self._install()

    # -- setup ------------------------------------------------------------------------------
    def _component(self, name: str) -> str:
        return component_of(self.family, name) or OTHER

    def _install(self) -> None:
        hook = lambda m, fn: self._handles.append(m.register_forward_hook(fn, with_kwargs=True))  # noqa: E731
        for name, module in self.model.named_modules():
            comp = self._component(name)
            if isinstance(module, (nn.Linear, *_CONV)):
                hook(module, self._matmul_hook(comp))
            elif not isinstance(module, nn.Embedding):
                raw = [p for p in module.parameters(recurse=False) if p.dim() == 2]
                if raw:
                    hook(module, self._raw_weight_hook(comp, raw))
                stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
                if stacked:
                    hook(module, self._expert_hook(comp, stacked))
            width = _attention_width(module)
            if width:
                hook(module, self._attention_hook(comp, width))
            elif all(isinstance(getattr(module, a, None), int) for a in SSM_ATTRS):
                hook(module, self._scan_hook(comp))
            self._watch_fused_output(module, comp)
        self._handles.append(self.model.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._exit, with_kwargs=True, always_call=True))

    def close(self) -> None:
        """Remove every hook (the model then runs exactly as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- accounting -------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new step's tally."""
        self._fwd: Dict[str, Number] = defaultdict(float)
        self._bwd: Dict[str, Number] = defaultdict(float)
        self._rows: Dict[str, int] = defaultdict(int)
        self._tokens: Dict[str, Number] = defaultdict(int)  # image / text / pad
        self._frame.clear()

    def tally(self) -> StepTally:
        """This rank's counts since ``reset()`` (call after the step's last backward)."""
        self._close_frame()
        comps = sorted({*self._fwd, *self._bwd, *self._rows})
        raw = StepTally(dict(self._fwd), dict(self._bwd), dict(self._rows),
                        self._tokens["image"], self._tokens["text"], self._tokens["pad"])
        return StepTally._from_vector(comps, _materialise(raw._vector(comps)))

    def _add(self, comp: str, flops: Number, grad_input: bool, grad_weight: bool) -> None:
        """Forward FLOPs, and the backward's: activation grads if the input needs them, weight grads if trained."""
        self._fwd[comp] += flops
        self._bwd[comp] += flops * (int(grad_input) + int(grad_weight))

    def _matmul(self, comp: str, flops: float, rows: int, grad_input: bool, grad_weight: bool) -> None:
        self._add(comp, flops, grad_input, grad_weight)
        self._frame[comp] = max(self._frame[comp], rows)

    def _matmul_hook(self, comp: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x = _first_tensor(args, kwargs, "input", "x")
            if _ignored() or x is None or not torch.is_tensor(output):
                return
            if isinstance(module, nn.Linear):
                rows = x.numel() // max(module.in_features, 1)  # input rows: a head may return a loss
                per_row = module.in_features * module.out_features
            else:
                rows = output.numel() // max(module.out_channels, 1)
                per_row = module.in_channels // module.groups * module.out_channels * math.prod(module.kernel_size)
            self._matmul(comp, 2.0 * per_row * rows, rows, x.requires_grad, module.weight.requires_grad)
        return hook

    def _raw_weight_hook(self, comp: str, weights: List[nn.Parameter]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x, y = _first_tensor(args, kwargs), _output_tensor(output)
            if _ignored() or x is None or not torch.is_tensor(y) or y.dim() == 0:
                return
            dims = {(x.shape[-1], y.shape[-1]), (y.shape[-1], x.shape[-1])}
            rows = y.numel() // max(y.shape[-1], 1)
            for w in weights:
                if tuple(w.shape) in dims:  # a weight mapping input features to output features
                    upstream = x.requires_grad or any(p.requires_grad for p in module.parameters() if p is not w)
                    self._matmul(comp, 2.0 * w.numel() * rows, rows, upstream, w.requires_grad)
        return hook

    def _expert_hook(self, comp: str, weights: List[nn.Parameter]) -> Callable:
        """Fused mixture-of-experts weights (experts x out x in), called with the routing's top-k index:
        each (token, expert) pair the router picked runs every expert matrix once."""
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x = _first_tensor(args, kwargs, "hidden_states")
            index = next((a for a in (*args[1:], *kwargs.values()) if torch.is_tensor(a) and a.dim() == 2
                          and not a.is_floating_point()), None)
            if _ignored() or x is None or index is None:
                return
            per_pair = sum(w[0].numel() for w in weights)
            self._add(comp, 2.0 * per_pair * index.numel(), x.requires_grad, any(w.requires_grad for w in weights))
        return hook

    def _attention_hook(self, comp: str, width: int) -> Callable:
        """QK^T and AV: 4 x width x sum of squared sequence lengths; backward 2x where grads flow."""
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x = _first_tensor(args, kwargs, "hidden_states")
            if _ignored() or x is None or x.dim() < 2:
                return
            cu = kwargs.get("cu_seqlens")
            if cu is None and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dim() == 1:
                cu = args[1]  # packed vision inputs may pass boundaries positionally
            if torch.is_tensor(cu) and cu.numel() > 1:
                squares: Number = (cu[1:] - cu[:-1]).double().pow(2).sum()
            else:
                squares = float(math.prod(x.shape[:-2]) * x.shape[-2] ** 2)
            grads = x.requires_grad or any(p.requires_grad for p in module.parameters())
            self._add(comp, 4.0 * width * squares, grads, grads)  # dS/dQ/dK and dP/dV: 2x forward
        return hook

    def _scan_hook(self, comp: str) -> Callable:
        """Mamba2 SSD scan per token: 2QGN (C.B^T) + 2Q.d_in (scores x X) + 4N.d_in (chunk states in/out)."""
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x = _first_tensor(args, kwargs, "hidden_states")
            if _ignored() or x is None or x.dim() < 2:
                return
            q, n = min(module.chunk_size, x.shape[-2]), module.ssm_state_size
            d_in = module.num_heads * module.head_dim
            flops = float(x.numel() // x.shape[-1]) * (2 * q * module.n_groups * n + 2 * q * d_in + 4 * n * d_in)
            grads = x.requires_grad or any(p.requires_grad for p in module.parameters())
            self._add(comp, flops, grads, grads)
        return hook

    def _watch_fused_output(self, module: nn.Module, comp: str) -> None:
        """Count an output projection that a fused kernel applied by weight, without calling the module
        (Mamba's training kernel takes ``outproj_weight``): it ran if its parent returned its width."""
        children = dict(module.named_children())
        wrapper = next((children[n] for n in OUT_NAMES if n in children), None)
        out = getattr(wrapper, "base_layer", wrapper)  # a LoRA-wrapped one: the kernel applies the base only
        if not isinstance(out, nn.Linear):
            return
        calls = [0]

        def after(mod: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x, y = _first_tensor(args, kwargs, "hidden_states"), _output_tensor(output)
            if calls[0] or _ignored() or x is None or not torch.is_tensor(y) or y.shape[-1] != out.out_features:
                return
            rows = y.numel() // out.out_features
            upstream = x.requires_grad or any(p.requires_grad for p in mod.parameters() if p is not out.weight)
            self._matmul(comp, 2.0 * out.in_features * out.out_features * rows, rows, upstream,
                         out.weight.requires_grad)
        self._handles += [wrapper.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)),
                          module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, 0)),
                          module.register_forward_hook(after, with_kwargs=True)]

    # -- per-forward token split --------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        self._depth += 1
        if self._depth > 1 or _ignored():
            return
        self._close_frame()
        ids, mask = _first_tensor(args, kwargs, "input_ids"), kwargs.get("attention_mask")
        if ids is None or ids.dim() != 2 or ids.is_floating_point():
            return
        if not (torch.is_tensor(mask) and mask.shape == ids.shape):  # per-layer masks: the trainer's real tokens
            mask, self.real_tokens_mask = self.real_tokens_mask, None
        real = mask.bool() if torch.is_tensor(mask) and mask.shape == ids.shape else torch.ones_like(ids, dtype=torch.bool)
        n_real = real.sum()
        self._tokens["pad"] += ids.numel() - n_real
        self._images_from_projector = not self.media_token_ids
        if self.media_token_ids:
            media = (torch.isin(ids, torch.tensor(self.media_token_ids, device=ids.device)) & real).sum()
            self._tokens["image"] += media
            self._tokens["text"] += n_real - media
        else:  # the projector's output rows, once the forward ends
            self._tokens["text"] += n_real

    def _exit(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and not _ignored():
            self._close_frame()

    def _close_frame(self) -> None:
        """Fold one forward's per-component rows into the tally."""
        if self._images_from_projector:
            projected = self._frame.get("vision_projection", 0)
            self._tokens["image"] += projected
            self._tokens["text"] -= projected
            self._images_from_projector = False
        for comp, rows in self._frame.items():
            self._rows[comp] += rows
        self._frame.clear()

    # -- parameters -------------------------------------------------------------------------
    def parameter_counts(self) -> Dict[str, Dict[str, int]]:
        """component -> total / trainable / adapter (LoRA) parameters, tied weights once."""
        counts: Dict[str, Dict[str, int]] = defaultdict(lambda: {"total": 0, "trainable": 0, "adapter": 0})
        seen = set()
        for name, p in self.model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            c = counts[self._component(name)]
            c["total"] += p.numel()
            c["trainable"] += p.numel() if p.requires_grad else 0
            c["adapter"] += p.numel() if "lora_" in name else 0
        return dict(counts)
