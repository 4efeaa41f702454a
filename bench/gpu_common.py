"""What every GPU microbenchmark shares: the device's nominal and measured memory bandwidth."""
from __future__ import annotations

from typing import Optional

import torch

# Nominal memory bandwidth, GB/s: (substring of the device name, min memory GiB, GB/s).
PEAK_GBS = [("H100 80GB HBM3", 0, 3350), ("H100 SXM", 0, 3350), ("A100", 60, 2039), ("A100", 0, 1555)]


def nominal_peak_gbs(name: str, memory_bytes: int) -> Optional[float]:
    """The table's peak GB/s for a device name, or None if the device is not in it."""
    for key, min_gib, gbs in PEAK_GBS:
        if key in name and memory_bytes >= min_gib * 2**30:
            return float(gbs)
    return None


def device_bandwidth(device: torch.device) -> tuple[float, Optional[float]]:
    """(measured copy GB/s over 256 MiB, nominal peak GB/s or None) of a CUDA device."""
    from triton.testing import do_bench

    props = torch.cuda.get_device_properties(device)
    src = torch.empty(2**28 // 4, dtype=torch.float32, device=device)  # 256 MiB, far out of L2
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3) / 1e9
    return copy_gbs, nominal_peak_gbs(props.name, props.total_memory)
