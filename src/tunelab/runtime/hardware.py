"""What machine we are on: threads, precision support, memory readings, a description for the manifest."""

from __future__ import annotations

import os
import platform
import resource

import torch

from tunelab.errors import ConfigError
from tunelab.runtime.cpuinfo import cpu_flags, cpu_model


ISA_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"})


def usable_cores() -> int:
    """Threads for torch: OMP_NUM_THREADS when set, else the cores this process may run on (the affinity
    mask), not the machine's total: in a container or under taskset, os.cpu_count() overcounts.

    Oversubscribed threads are far worse than too few: with other busy processes on the same cores, the
    threads of one matmul wait on each other at every barrier (we measured ~20x slower steps with 2 threads
    on 2 busy cores). Set OMP_NUM_THREADS=1 for runs that share the machine.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls run natively. Without them bf16 is emulated and slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(requested: str) -> str:
    """'auto' -> the fastest precision that is numerically safe here."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision 'fp16' needs a CUDA GPU; on CPU use 'bf16' (AMX/AVX512-BF16) or 'fp32'")
    return requested


def precision_for_run(recorded: str | None, requested: str = "auto") -> tuple[str, str | None]:
    """The precision to use again for a run that trained in `recorded` (its manifest's "precision"), and a
    one-line note when this machine cannot honour it.

    A run's precision is part of the run: resuming it, evaluating it or generating with it elsewhere must
    compute what it trained with, not re-resolve `auto` on the new machine (an fp32 run would be evaluated in
    bf16 on an AVX512-BF16 host without a word). Where this machine cannot run the recorded precision
    natively (bf16 on a CPU without AVX512-BF16/AMX is emulated, an order of magnitude slower; fp16 needs a
    GPU), fp32 is used and the note says so. A run from before precision was recorded resolves `requested`.
    """
    if recorded is None:
        return resolve_precision(requested), None
    if recorded == "fp32":
        return "fp32", None
    cuda = torch.cuda.is_available()
    if recorded == "bf16":
        native = torch.cuda.is_bf16_supported() if cuda else cpu_has_fast_bf16()
        if native:
            return "bf16", None
        where = "this GPU has no bf16" if cuda else "this CPU has no AVX512-BF16 or AMX, so bf16 is emulated"
    elif recorded == "fp16":
        if cuda:
            return "fp16", None
        where = "fp16 autocast needs a CUDA GPU"
    else:
        raise ConfigError(f"the run records precision '{recorded}', which is not one of fp32, bf16, fp16")
    return "fp32", f"this run trained in {recorded}, but {where}: using fp32 here (results can differ slightly)"


# glibc's mallopt parameters (malloc.h), and what train.cpu_heap=keep sets them to
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_HEAP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
# The same settings as glibc's environment variables (read at process start), for processes tunelab does not run
KEEP_HEAP_ENV = {
    "MALLOC_MMAP_MAX_": str(KEEP_HEAP[_M_MMAP_MAX]), "MALLOC_TRIM_THRESHOLD_": str(KEEP_HEAP[_M_TRIM_THRESHOLD]),
}


def configure_cpu_heap(mode: str) -> str:
    """Apply train.cpu_heap to this process's C heap; return what is in effect, for the run's metrics.

    PyTorch's CPU tensors come from malloc. glibc serves blocks above a threshold (up to 32 MiB) with their
    own mmap and gives them back to the kernel on free, and trims the heap's free top: every training step
    then faults its activations' pages in again, zero-filled by the kernel. 'keep' turns both off, so freed
    blocks stay in the process and the next step reuses them. On this project's 2-core CPU that made IMDB
    MiniLM LoRA training 1.11x faster with the peak RSS within 2% (the ablation in docs/09-optimization.md).
    The price: resident memory stays at its high-water mark until the process exits. jemalloc or tcmalloc
    (LD_PRELOAD) cache freed memory likewise; this needs no extra library.

    Only glibc is touched, only when asked, and never when the user set MALLOC_* variables themselves.
    """
    if mode != "keep":
        return "release"
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "environment"  # the user's own glibc settings win
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "release"
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = all(libc.mallopt(param, value) == 1 for param, value in KEEP_HEAP.items())
    except (OSError, AttributeError):
        return "release"
    return "keep" if applied else "release"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by tensors on CUDA; on CPU the process's peak resident set size.

    On Linux that is VmHWM, the high-water mark of this process's own memory since it started its program.
    Not getrusage's ru_maxrss: Linux carries the parent's high-water mark into a child when it execs, so a
    run started by a large process (a notebook, a test session, a sweep that trained before) would report the
    parent's peak instead of its own (measured: 811 MiB reported by a 12 MiB child).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if platform.system() == "Darwin" else maxrss * 1024  # macOS reports bytes, the others KiB


def describe() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        # the flags that choose a path (precision auto, bitsandbytes' CPU layout): which host a result came from
        "cpu_isa": sorted(ISA_FLAGS & cpu_flags()),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info
