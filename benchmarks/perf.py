"""Shared measurement helpers for the benchmark scripts: FLOPs, MFU, device memory, load average."""

from __future__ import annotations

import os

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {
    "H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
    "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (every CPU)."""
    kind = device.device_kind
    for name in sorted(PEAK_BF16, key=len, reverse=True):  # most specific name first
        if name.lower() in kind.lower():
            return PEAK_BF16[name]
    return None


def total_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOP count of a lowered or compiled program (None if the backend gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def mfu_line(flops: float | None, seconds: float, device, bf16: bool) -> str:
    if not flops:
        return "MFU           n/a (no XLA FLOP count)"
    peak = peak_flops(device)
    if peak and bf16:
        return f"MFU           {flops / seconds / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 peak"
    return "MFU           n/a (no known bf16 peak for this device / dtype)"


def xla_memory(compiled) -> float | None:
    """Bytes of the executable's arguments + outputs + temporaries − aliases (XLA's own estimate)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)


def peak_device_memory(device) -> float | None:
    """``peak_bytes_in_use`` from the device allocator (GPU/TPU); None on CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return float(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def memory_line(compiled, device) -> str:
    peak = peak_device_memory(device)
    xla = xla_memory(compiled)
    parts = [f"device peak {peak / 2**30:.2f} GiB" if peak else "device peak n/a (no allocator stats)"]
    if xla:
        parts.append(f"XLA estimate {xla / 2**30:.2f} GiB")
    return "memory        " + ", ".join(parts)


def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"
