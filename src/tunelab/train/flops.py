"""FLOPs accounting: model FLOPs per token, the hardware's peak rate, and MFU.

MFU (model FLOPs utilization, Chowdhery et al. 2022, "PaLM", appendix B) is the model FLOPs a run achieved
per second over the hardware's peak: model FLOPs count what the model needs (6N per trained token for full
fine-tuning), not what a run spent (gradient checkpointing's recomputed forward is excluded), so runs with
and without recomputation compare on the same scale.

Peak rates are dense (no 2:4 sparsity) tensor-core rates from the vendors' datasheets. An unknown device
gets None and MFU stays null: a guessed peak would make every MFU after it a guess too.
"""

from __future__ import annotations

import re

import torch

from tunelab.runtime.cpuinfo import cpu_fields
from tunelab.runtime.hardware import cpu_flags, usable_cores

TFLOPS = 1e12

# (name pattern, {precision: dense peak FLOP/s}). "fp32" on a GPU is the non-tensor-core rate; "tf32" is what
# fp32 matmuls run at when torch.set_float32_matmul_precision("high"/"medium") allows tensor cores.
# More specific patterns come first (H100 PCIe before H100).
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    # H200 SXM datasheet: BF16/FP16 1,979 TFLOPS with sparsity -> 989 dense; TF32 989 sparse -> 494.5; FP32 67.
    (r"H200 NVL", {"bf16": 835 * TFLOPS, "fp16": 835 * TFLOPS, "tf32": 417.5 * TFLOPS, "fp32": 60 * TFLOPS}),
    (r"H200", {"bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS, "tf32": 494.5 * TFLOPS, "fp32": 67 * TFLOPS}),
    # H100 datasheet: PCIe BF16/FP16 1,513 sparse -> 756 dense, TF32 378, FP32 51; NVL 1,671 -> 835, TF32
    # 417.5, FP32 60; SXM 1,979 -> 989, TF32 494.5, FP32 67.
    (r"H100.*PCIe", {"bf16": 756 * TFLOPS, "fp16": 756 * TFLOPS, "tf32": 378 * TFLOPS, "fp32": 51 * TFLOPS}),
    (r"H100 NVL", {"bf16": 835 * TFLOPS, "fp16": 835 * TFLOPS, "tf32": 417.5 * TFLOPS, "fp32": 60 * TFLOPS}),
    (r"H100", {"bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS, "tf32": 494.5 * TFLOPS, "fp32": 67 * TFLOPS}),
    # A100 datasheet (40 and 80 GB, SXM and PCIe alike): BF16/FP16 312, TF32 156, FP32 19.5.
    (r"A100", {"bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "tf32": 156 * TFLOPS, "fp32": 19.5 * TFLOPS}),
    # L4 datasheet: BF16/FP16 242 sparse -> 121 dense, TF32 120 sparse -> 60, FP32 30.3.
    (r"\bL4\b", {"bf16": 121 * TFLOPS, "fp16": 121 * TFLOPS, "tf32": 60 * TFLOPS, "fp32": 30.3 * TFLOPS}),
    # A10 datasheet: BF16/FP16 250 sparse -> 125 dense, TF32 125 sparse -> 62.5, FP32 31.2. AWS publishes no
    # sheet for its A10G (same GA102 part); the A10's numbers are used for it. Replace them if you measure less.
    (r"A10G?\b", {"bf16": 125 * TFLOPS, "fp16": 125 * TFLOPS, "tf32": 62.5 * TFLOPS, "fp32": 31.2 * TFLOPS}),
    # T4 datasheet: FP16 tensor (mixed precision) 65, FP32 8.1. No bf16 or tf32 units.
    (r"T4\b", {"fp16": 65 * TFLOPS, "fp32": 8.1 * TFLOPS}),
    # V100 datasheet: SXM2 tensor 125, FP32 15.7; PCIe tensor 112, FP32 14. No bf16 or tf32 units.
    (r"V100.*PCI", {"fp16": 112 * TFLOPS, "fp32": 14 * TFLOPS}),
    (r"V100", {"fp16": 125 * TFLOPS, "fp32": 15.7 * TFLOPS}),
    # Ada whitepaper (RTX 4090): FP16/BF16 tensor with FP32 accumulate (what torch uses) 165.2 dense,
    # TF32 82.6, FP32 82.6.
    (r"RTX 4090(?! ?[DT])",
     {"bf16": 165.2 * TFLOPS, "fp16": 165.2 * TFLOPS, "tf32": 82.6 * TFLOPS, "fp32": 82.6 * TFLOPS}),
    # Ampere GA102 whitepaper (RTX 3090): FP16/BF16 tensor with FP32 accumulate 71 dense, TF32 35.6, FP32 35.6.
    (r"RTX 3090(?! ?Ti)", {"bf16": 71 * TFLOPS, "fp16": 71 * TFLOPS, "tf32": 35.6 * TFLOPS, "fp32": 35.6 * TFLOPS}),
]


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU called `name` (as torch.cuda.get_device_name gives it) at `precision`
    ("bf16", "fp16", "tf32" or "fp32"); None when the GPU or the precision is not in the table."""
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return peaks.get(precision)
    return None


# ------------------------------------------------------------------------------------------------ CPU


def cpu_clock_hz() -> float | None:
    """The highest clock the cores reach: cpufreq's max (what lscpu calls max MHz), else /proc/cpuinfo's
    current `cpu MHz` (what a VM without cpufreq exposes)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as f:
            return int(f.read().strip()) * 1e3  # kHz
    except (OSError, ValueError):
        pass
    mhz = cpu_fields().get("cpu MHz")
    try:
        return float(mhz) * 1e6 if mhz else None
    except ValueError:
        return None


def cpu_flops_per_cycle(precision: str, flags: frozenset[str] | None = None, vendor: str = "",
                        family: int = 0) -> int | None:
    """FLOPs one core retires per cycle at `precision`, from the widest vector/matrix ISA it has.

    fp32: 2 FMA units x vector lanes x 2 (an FMA is two FLOPs): AVX-512 16 lanes -> 64, AVX2+FMA 8 lanes -> 32.
          AMD Zen 4 (family 25 with avx512f) runs 512-bit ops on 256-bit units -> 32.
    bf16: AMX-BF16 tiles 1,024 (Intel: 16x the AVX-512 fp32 rate); AVX512-BF16's dot product 128 (two bf16
          products per fp32 lane). Without either, bf16 is emulated and has no rate of its own: None.
    """
    flags = cpu_flags() if flags is None else flags
    if precision == "bf16":
        if "amx_bf16" in flags:
            return 1024
        if "avx512_bf16" in flags:
            return 128
        return None
    if precision != "fp32":
        return None
    if "avx512f" in flags:
        return 32 if (vendor == "AuthenticAMD" and family == 25) else 64
    if "avx2" in flags and "fma" in flags:
        return 32
    return None


def cpu_peak_flops(precision: str) -> float | None:
    """usable cores x clock x FLOPs/cycle/core. Counts the cores this process may use (its affinity mask):
    in a container that is the share it runs on, not the host's."""
    info = cpu_fields()
    try:
        family = int(info.get("cpu family", "0"))
    except ValueError:
        family = 0
    per_cycle = cpu_flops_per_cycle(precision, vendor=info.get("vendor_id", ""), family=family)
    clock = cpu_clock_hz()
    if per_cycle is None or clock is None:
        return None
    return usable_cores() * clock * per_cycle


# ------------------------------------------------------------------------------------------------ API


def peak_flops(device: torch.device | str, precision: str = "fp32") -> float | None:
    """Dense peak FLOP/s of `device` at the run's precision ("fp32", "bf16", "fp16"); None when unknown.

    On CUDA, fp32 matmuls count at the TF32 tensor-core rate when torch is allowed to use it
    (torch.set_float32_matmul_precision("high")), else at the plain FP32 rate.
    """
    device = torch.device(device) if isinstance(device, str) else device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
            precision = "tf32"
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        return cpu_peak_flops(precision)
    return None


def mfu(flops_per_token: float | None, tokens_per_s: float | None, peak: float | None) -> float | None:
    """Achieved model FLOP/s over peak, in [0, 1]-ish; None when any input is unknown or zero.

    Pass one device's numbers: the tokens/s of one process and that process's device peak.
    """
    if not flops_per_token or not tokens_per_s or not peak:
        return None
    return flops_per_token * tokens_per_s / peak
