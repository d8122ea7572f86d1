"""Achieved TFLOP/s and model FLOPs utilisation (MFU) from counted FLOPs and the device's peak.

The FLOPs come from ``training.flops.FlopCounter``; the peak is looked up by device name
(or set with ``tracking.peak_tflops``).
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Union

import torch

# Dense (no sparsity) BF16 tensor-core peaks in TFLOPS per device, from the vendors' datasheets
# (NVIDIA H100/H200/B200/GB200/A100/L40S/L40/L4/A10/RTX 4090 (Ada whitepaper, FP32 accumulate),
# AMD Instinct MI300X/MI325X), whose headline numbers are "with sparsity": halved here.
# First match wins, so more specific names come first.
PEAK_BF16_TFLOPS: Sequence[tuple] = (
    (r"GB200", 2500.0), (r"B200", 2250.0), (r"H[12]00 NVL", 835.0), (r"H100.*PCIe", 756.0),
    (r"H100|H200|GH200", 989.0), (r"A100", 312.0), (r"L40S", 362.0), (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0), (r"\bA10G?\b", 125.0), (r"RTX 4090", 165.0), (r"MI3(00|25)X", 1307.0),
)


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
    try:
        device = torch.device(device) if isinstance(device, str) else device
    except RuntimeError:  # not a device spec: a device name
        pass
    if device is None or isinstance(device, torch.device):
        if device is None or device.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device)
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, str(name)):
            return peak
    return None


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
