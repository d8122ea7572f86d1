"""FLOPs and model FLOPs utilisation (MFU) of VLM training steps, vision tower included.

MFU reports for VLMs usually count only the language model; on image-heavy batches the vision
tower (hundreds of patches per image, often a 0.4-0.6B ViT) is a large share of the work, so they
understate it. Here every component the registry names is counted, by measuring what ran.

What is counted, per micro-batch, by forward hooks installed once:

* Matmul FLOPs. Every ``nn.Linear`` / ``nn.ConvNd`` that runs (LoRA's ``lora_A``/``lora_B`` are
  Linears of their own, so adapters count as their own matmuls), and every raw 2-D weight that maps
  its module's input features to its output features (Gemma 3's projector), adds
  ``F = 2 x weight_params x rows``, rows = the output positions it actually produced. Measuring
  rows per module gets the parts that run at their own token counts right: the projector at image
  tokens, a merger at patches/4, the LM head at the labelled positions only (``logits_to_keep``),
  and weights that never run (a video-only patch projection on an image batch) count nothing.
  Embedding lookups, norms, activations and the Mamba state-space scan are not matmuls here
  (the scan is ~1-2% of a Mamba layer).
* Attention scores. Every module that holds attention (a direct ``q_proj``-like child Linear; Mamba
  mixers have none, so in a hybrid LM only attention layers count) adds
  ``A = 4 x width x sum(seq_len^2)``: QK^T and AV (2 x s^2 x width each), width = the query
  projection's out_features (heads x head_dim); one sequence per image/window for packed vision
  inputs (``cu_seqlens``), per row of the batch otherwise. Full s^2, as a dense kernel computes it:
  causal and sliding-window masking are not discounted.
* Backward, only where autograd does work, read from ``requires_grad`` at run time:
  activation gradients cost ``F`` per matmul whose input requires grad (a frozen vision tower with
  nothing trainable before it has none), weight gradients cost ``F`` per trainable weight, and the
  attention core costs ``2 x A`` where its inputs or weights require grad. Full fine-tuning thus
  gives the familiar 6 x params x tokens. Nothing is counted without grad mode (validation).
* Activation-checkpoint recompute is NOT counted (hooks firing inside the backward are ignored):
  this is MFU, not hardware FLOPs utilisation.

Tokens: the rows processed by each component (its largest matmul's rows per forward), and the LM
input split into image/video tokens (positions holding the config's image/video token ids, or the
projector's output rows when the config names none), text tokens and padding. Padding rows are
processed, so they are in the FLOPs; ``pad_tokens`` shows how much of the work they were.
"""

from __future__ import annotations

import math
import re
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

# Dense (no sparsity) BF16 tensor-core peaks in TFLOPS per device, from the vendors' datasheets
# (NVIDIA H100/H200/B200/GB200/A100/L40S/L40/L4/A10/RTX 4090 (Ada whitepaper, FP32 accumulate),
# AMD Instinct MI300X/MI325X), whose headline numbers are "with sparsity": halved here.
# First match wins, so more specific names come first.
PEAK_BF16_TFLOPS: Sequence[tuple] = (
    (r"GB200", 2500.0),
    (r"B200", 2250.0),
    (r"H[12]00 NVL", 835.0),
    (r"H100.*PCIe", 756.0),
    (r"H100|H200|GH200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G?\b", 125.0),
    (r"RTX 4090", 165.0),
    (r"MI3[02]5?X", 1307.0),
)


def _in_backward() -> bool:
    """True while autograd's engine runs (checkpoint recompute fires forward hooks there)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - older torch
        return False


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


@dataclass
class StepTally:
    """What one rank's forwards/backwards cost since the last reset."""

    forward_flops: Dict[str, float] = field(default_factory=dict)   # component -> FLOPs
    backward_flops: Dict[str, float] = field(default_factory=dict)  # component -> FLOPs
    rows: Dict[str, int] = field(default_factory=dict)              # component -> tokens processed
    image_tokens: int = 0
    text_tokens: int = 0
    pad_tokens: int = 0

    @property
    def flops(self) -> float:
        """Training FLOPs: forward plus backward, all components."""
        return sum(self.forward_flops.values()) + sum(self.backward_flops.values())

    def component_flops(self, component: str) -> float:
        return self.forward_flops.get(component, 0.0) + self.backward_flops.get(component, 0.0)

    def metrics(self) -> Dict[str, float]:
        """Flat numbers to log (sum over ranks first with ``summed`` for global values)."""
        out = {"flops": self.flops, "image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
               "pad_tokens": self.pad_tokens, "vision_patches": self.rows.get("vision_tower", 0)}
        if self.flops:
            vision = self.component_flops("vision_tower") + self.component_flops("vision_projection")
            out["vision_flops_fraction"] = vision / self.flops
        return out

    def summed(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> "StepTally":
        """Sum over ranks with ONE collective: ``reduce`` gets a float64 CPU vector, returns its sum."""
        comps = [c for c in (*COMPONENT_ORDER, OTHER)]
        values = ([self.forward_flops.get(c, 0.0) for c in comps] + [self.backward_flops.get(c, 0.0) for c in comps]
                  + [float(self.rows.get(c, 0)) for c in comps]
                  + [float(self.image_tokens), float(self.text_tokens), float(self.pad_tokens)])
        total = reduce(torch.tensor(values, dtype=torch.float64)).detach().cpu().tolist()
        n = len(comps)
        keep = lambda vals: {c: v for c, v in zip(comps, vals) if v}  # noqa: E731
        return StepTally(keep(total[:n]), keep(total[n:2 * n]), {c: int(v) for c, v in keep(total[2 * n:3 * n]).items()},
                         int(total[-3]), int(total[-2]), int(total[-1]))


class FlopCounter:
    """Hooks a (PEFT/DDP-wrapped) VLM once; ``reset()`` and ``tally()`` bracket each step."""

    def __init__(self, model: Any, family: Union[ModelFamily, str],
                 media_token_ids: Optional[Iterable[int]] = None) -> None:
        self.family = get_family(family) if isinstance(family, str) else family
        self.model = _unwrap(model)
        if media_token_ids is None:
            config = getattr(self.model, "config", None)
            ids = {getattr(config, a, None) for a in MEDIA_TOKEN_ATTRS}
            media_token_ids = [i for i in ids if isinstance(i, int)]
        self.media_token_ids = sorted(set(media_token_ids))
        self._handles: List[Any] = []
        self._depth = 0
        self._frame: Dict[str, int] = defaultdict(int)
        self.reset()
        self._install()

    # -- setup ------------------------------------------------------------------------------
    def _component(self, name: str) -> str:
        return component_of(self.family, name) or OTHER

    def _install(self) -> None:
        hook = lambda m, fn, **kw: self._handles.append(m.register_forward_hook(fn, **kw))  # noqa: E731
        for name, module in self.model.named_modules():
            comp = self._component(name)
            if isinstance(module, (nn.Linear, *_CONV)):
                hook(module, self._matmul_hook(comp), with_kwargs=True)
            elif not isinstance(module, nn.Embedding):
                raw = [p for p in module.parameters(recurse=False) if p.dim() == 2]
                if raw:
                    hook(module, self._raw_weight_hook(comp, raw), with_kwargs=True)
            width = _attention_width(module)
            if width:
                hook(module, self._attention_hook(comp, width), with_kwargs=True)
            elif all(isinstance(getattr(module, a, None), int) for a in SSM_ATTRS):
                hook(module, self._scan_hook(comp), with_kwargs=True)
            self._watch_fused_output(module, comp)
        self._handles.append(self.model.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._exit, with_kwargs=True))

    def close(self) -> None:
        """Remove every hook (the model then runs exactly as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- accounting -------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new step's tally."""
        self._tally = StepTally(defaultdict(float), defaultdict(float), defaultdict(int))
        self._frame.clear()

    def tally(self) -> StepTally:
        """This rank's counts since ``reset()`` (call after the step's last backward)."""
        self._close_frame()
        t = self._tally
        return StepTally(dict(t.forward_flops), dict(t.backward_flops), dict(t.rows),
                         t.image_tokens, t.text_tokens, t.pad_tokens)

    def _add(self, comp: str, flops: float, rows: int, grad_input: bool, grad_weight: bool) -> None:
        self._tally.forward_flops[comp] += flops
        if torch.is_grad_enabled():
            self._tally.backward_flops[comp] += flops * (int(grad_input) + int(grad_weight))
        self._frame[comp] = max(self._frame[comp], rows)

    def _matmul_hook(self, comp: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x = _first_tensor(args, kwargs, "input", "x")
            if _in_backward() or x is None or not torch.is_tensor(output):
                return
            if isinstance(module, nn.Linear):
                rows = output.numel() // max(module.out_features, 1)
                per_row = module.in_features * module.out_features
            else:
                rows = output.numel() // max(module.out_channels, 1)
                per_row = module.in_channels // module.groups * module.out_channels * math.prod(module.kernel_size)
            self._add(comp, 2.0 * per_row * rows, rows, x.requires_grad, module.weight.requires_grad)
        return hook

    def _raw_weight_hook(self, comp: str, weights: List[nn.Parameter]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x, y = _first_tensor(args, kwargs), _output_tensor(output)
            if _in_backward() or x is None or y is None or not torch.is_tensor(y) or y.dim() == 0:
                return
            dims = {(x.shape[-1], y.shape[-1]), (y.shape[-1], x.shape[-1])}
            rows = y.numel() // max(y.shape[-1], 1)
            for w in weights:
                if tuple(w.shape) in dims:  # a weight mapping input features to output features
                    others = any(p.requires_grad for p in module.parameters() if p is not w)
                    self._add(comp, 2.0 * w.numel() * rows, rows, x.requires_grad or others, w.requires_grad)
        return hook

    def _attention_hook(self, comp: str, width: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x = _first_tensor(args, kwargs, "hidden_states")
            if _in_backward() or x is None or x.dim() < 2:
                return
            cu = kwargs.get("cu_seqlens")
            if cu is None and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dim() == 1:
                cu = args[1]  # packed vision inputs pass boundaries positionally
            if torch.is_tensor(cu) and cu.numel() > 1:
                squares = float((cu[1:] - cu[:-1]).double().pow(2).sum())
            else:
                squares = float(math.prod(x.shape[:-2]) * x.shape[-2] ** 2)
            flops = 4.0 * width * squares
            self._tally.forward_flops[comp] += flops
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
                self._tally.backward_flops[comp] += 2.0 * flops
        return hook

    def _scan_hook(self, comp: str) -> Callable:
        """Mamba2 SSD scan per token: 2QGN (C.B^T) + 2Q.d_in (scores x X) + 4N.d_in (chunk states in/out)."""
        def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x = _first_tensor(args, kwargs, "hidden_states")
            if _in_backward() or x is None or x.dim() < 2:
                return
            q = min(module.chunk_size, x.shape[-2])
            d_in, n = module.num_heads * module.head_dim, module.ssm_state_size
            flops = float(x.numel() // x.shape[-1]) * (2 * q * module.n_groups * n + 2 * q * d_in + 4 * n * d_in)
            self._tally.forward_flops[comp] += flops
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
                self._tally.backward_flops[comp] += 2.0 * flops
        return hook

    def _watch_fused_output(self, module: nn.Module, comp: str) -> None:
        """Count an output projection that a fused kernel applied by weight, without calling the module
        (Mamba's training kernel takes ``outproj_weight``): it ran if its parent returned its width."""
        children = dict(module.named_children())
        out = next((children[n] for n in OUT_NAMES if isinstance(children.get(n), nn.Linear)), None)
        if out is None:
            return
        calls = [0]
        counted = out.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        before = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, 0))

        def after(mod: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
            x, y = _first_tensor(args, kwargs, "hidden_states"), _output_tensor(output)
            if calls[0] or _in_backward() or x is None or not torch.is_tensor(y) or y.shape[-1] != out.out_features:
                return
            rows = y.numel() // out.out_features
            upstream = x.requires_grad or any(p.requires_grad for p in mod.parameters() if p is not out.weight)
            self._add(comp, 2.0 * out.in_features * out.out_features * rows, rows, upstream, out.weight.requires_grad)
        self._handles += [counted, before, module.register_forward_hook(after, with_kwargs=True)]

    # -- per-forward token split --------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        self._depth += 1
        if self._depth > 1 or _in_backward():
            return
        self._close_frame()
        ids = _first_tensor(args, kwargs, "input_ids")
        mask = kwargs.get("attention_mask")
        if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point:
            return
        real = mask.bool() if torch.is_tensor(mask) and mask.shape == ids.shape else torch.ones_like(ids, dtype=torch.bool)
        n_real = int(real.sum())
        self._tally.pad_tokens += ids.numel() - n_real
        if self.media_token_ids:
            media = torch.isin(ids, torch.tensor(self.media_token_ids, device=ids.device)) & real
            n_media = int(media.sum())
            self._tally.image_tokens += n_media
            self._tally.text_tokens += n_real - n_media
        else:  # image tokens from the projector's rows when the forward ends
            self._tally.text_tokens += n_real
            self._frame["_count_projector_rows"] = 1

    def _exit(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and not _in_backward():
            self._close_frame()

    def _close_frame(self) -> None:
        """Fold one forward's per-component rows into the tally."""
        frame = self._frame
        if frame.pop("_count_projector_rows", 0):
            projected = frame.get("vision_projection", 0)
            self._tally.image_tokens += projected
            self._tally.text_tokens -= projected
        for comp, rows in frame.items():
            self._tally.rows[comp] += rows
        frame.clear()

    # -- parameters -------------------------------------------------------------------------
    def parameter_counts(self) -> Dict[str, Dict[str, int]]:
        """component -> total / trainable / adapter parameters (tied weights once)."""
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


# ------------------------------------------------------------------------------------------ peak & MFU
def peak_tflops(device: Union[torch.device, str, None] = None, override: Optional[float] = None) -> Optional[float]:
    """Dense BF16 peak TFLOPS of one device: ``override`` if given (config), else looked up by name.

    ``device`` is a torch device (its name is asked from CUDA/ROCm) or a device name string such as
    "NVIDIA H100 80GB HBM3". CPUs and unknown devices give None (MFU is then not reported).
    """
    if override is not None:
        if not override > 0:
            raise ValueError(f"config error: peak TFLOPS must be > 0, got {override!r}")
        return float(override)
    name = device
    if device is None or isinstance(device, torch.device) or _is_device_string(device):
        dev = torch.device(device) if device is not None else None
        if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(dev)
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, str(name)):
            return peak
    return None


def _is_device_string(value: str) -> bool:
    return bool(re.fullmatch(r"(cpu|cuda|mps|xpu|meta)(:\d+)?", str(value)))


def step_report(step_flops: float, seconds: float, num_devices: int, peak: Optional[float]) -> Dict[str, float]:
    """Achieved TFLOPS per device and MFU (fraction of ``peak``; absent when the peak is unknown).

    ``step_flops`` is the step's total over all devices (``StepTally.summed(...).flops``).
    """
    if seconds <= 0 or num_devices < 1:
        raise ValueError(f"step_report needs seconds > 0 and num_devices >= 1, got {seconds}, {num_devices}")
    tflops = step_flops / seconds / num_devices / 1e12
    report = {"tflops": tflops}
    if peak:
        report["mfu"] = tflops / peak
    return report
