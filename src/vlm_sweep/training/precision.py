"""The run's compute precision: what ``parallel.mixed_precision`` resolves to, and why.

``auto`` picks bf16 autocast where the device runs it well, fp32 elsewhere:

- a CUDA GPU with bf16 (Ampere and later): bf16;
- a CPU with native bf16 instructions (AVX512-BF16 or AMX): bf16 when the language model is at
  least ``CPU_BF16_MIN_HIDDEN`` wide. On a CPU, autocast casts every frozen weight again on every
  forward (its cast cache keeps only trainable leaves), and the matmuls must be wide enough to pay
  for that. Measured on an AVX512-BF16 CPU, one thread, LoRA, micro-batches of ~250-400 tokens
  (fp32 time / bf16 time): 0.83x at 64 wide, 1.08x at 128, 1.21x at 256, 1.35x at 384, 1.56x at
  512; every hub model is far above the line (docs/performance.md, ``make bench`` checks it);
- anything else (a CPU without bf16 instructions, a GPU without bf16): fp32.

A resumed run keeps the precision its checkpoint was trained in where the device runs it.
``no`` (or ``fp32``, the same), ``bf16`` and ``fp16`` are taken as written.
"""

from __future__ import annotations

from typing import Optional, Tuple

# Narrowest language model (hidden size) for which bf16 autocast beats fp32 on a native-bf16 CPU.
CPU_BF16_MIN_HIDDEN = 128


def cpu_bf16_instructions() -> Optional[str]:
    """The CPU's native bf16 instruction set (``AMX`` or ``AVX512-BF16``), None without one."""
    import torch

    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


def resolve_precision(requested: str, hidden_size: Optional[int], cuda: Optional[bool] = None,
                      started_in: Optional[str] = None) -> Tuple[str, str]:
    """(Accelerate's mixed_precision: ``no``/``bf16``/``fp16``, the reason in words) for this device.

    ``hidden_size``: the language model's width (None: unknown, taken as a real model's).
    ``started_in``: what a resumed run's checkpoint was trained in. auto keeps it wherever this device
    can run it, so a run requeued onto another kind of machine continues its loss curve in the same
    arithmetic instead of silently switching.
    """
    if requested != "auto":
        return ("no" if requested == "fp32" else requested), "as configured"
    import torch  # here, not at module import: the recipe module imports this one and stays light

    cuda = torch.cuda.is_available() if cuda is None else cuda
    fresh, why = _auto_precision(hidden_size, cuda)
    if started_in is None or started_in == fresh:
        return fresh, why
    if started_in == "no" or (started_in == "bf16" and (not cuda or torch.cuda.is_bf16_supported())):
        return started_in, (f"auto: kept {precision_name(started_in)}, what the resumed checkpoint was trained in "
                            f"(on this machine auto alone picks {precision_name(fresh)})")
    return fresh, f"{why}; the resumed checkpoint was trained in {precision_name(started_in)}, which this device lacks"


def _auto_precision(hidden_size: Optional[int], cuda: bool) -> Tuple[str, str]:
    import torch

    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU runs bf16"
        return "no", "auto: the GPU has no bf16"
    instructions = cpu_bf16_instructions()
    if instructions is None:
        return "no", "auto: this CPU has no native bf16 (AVX512-BF16 or AMX)"
    if hidden_size is not None and hidden_size < CPU_BF16_MIN_HIDDEN:
        return "no", (f"auto: CPU with {instructions}, but the language model is {hidden_size} wide; bf16 "
                      f"autocast pays from {CPU_BF16_MIN_HIDDEN} wide")
    width = "width unknown" if hidden_size is None else f"language model {hidden_size} wide"
    return "bf16", f"auto: CPU with {instructions}, {width}"


def precision_name(precision: str) -> str:
    """What a person reads: fp32 for Accelerate's ``no``."""
    return "fp32" if precision == "no" else precision
