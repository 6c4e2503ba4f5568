"""bitsandbytes only where it is used (QLoRA, 8-bit AdamW), and quiet and correct when it is.

Four problems a user met, one fix each:

- PEFT imports bitsandbytes as soon as PEFT itself is imported (peft/helpers.py), and on CPUs with
  AVX512-BF16 bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import: every
  command, even a full fine-tuning `predict`, printed it. `import_peft()` hides bitsandbytes while PEFT loads;
  PEFT and transformers look for it again (their cached checks are cleared) when a QLoRA run loads a model.
- That message is about an optional kernel for bitsandbytes' CPU inference layout, which tunelab turns off
  (next point), so when QLoRA or 8-bit AdamW do import bitsandbytes the record is dropped (_DropKernelNotice).
- bitsandbytes 0.50 converts a 4-bit layer on an AVX512-BF16 CPU to an inference-only layout the first time it
  runs in eval mode without gradients, and keeps it. That layout's matmul (bitsandbytes::gemv_4bit) has no
  backward, so every training step after an evaluation (a QLoRA LM run evaluates the untuned model first)
  silently lost the gradient through every 4-bit layer; torch's only sign was "This may lead to silently
  incorrect behavior". `keep_4bit_layers_trainable()` turns the conversion off: evaluation then runs the same
  dequantize-and-matmul path as training (tests/test_quiet_bitsandbytes.py checks the gradients).
- On the same CPUs bitsandbytes fetches that kernel from the Hugging Face Hub at import, through the `kernels`
  package, when the machine is online, whoever imports it (PEFT does for every LoRA model): an import hook
  (_NoHubKernels) hides `kernels` while bitsandbytes imports, so no code is downloaded and run without
  --trust-remote-code (tests/test_quiet_bitsandbytes.py checks it).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing this module must stay light: config loading imports the methods
    from torch import nn

_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_KERNEL_NOTICE)


# Installed before anything can import bitsandbytes: the module logs through this logger at import time.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelNotice())


def import_peft():
    """Import PEFT without importing bitsandbytes (see the module docstring)."""
    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        import peft

        return peft
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError; find_spec returns None
    try:
        import peft
    finally:
        del sys.modules["bitsandbytes"]
    _forget_cached_availability()
    return peft


def _forget_cached_availability() -> None:
    """PEFT and transformers cache "is bitsandbytes installed?": the answer given while it was hidden is wrong."""
    from peft import import_utils
    from transformers.utils import import_utils as hf_import_utils

    for check in (import_utils.is_bnb_available, import_utils.is_bnb_4bit_available,
                  getattr(hf_import_utils, "is_bitsandbytes_available", None)):
        if hasattr(check, "cache_clear"):
            check.cache_clear()


def import_bitsandbytes():
    """The real import, for QLoRA and 8-bit AdamW (ImportError when it is not installed)."""
    import bitsandbytes

    return bitsandbytes


@contextlib.contextmanager
def _kernels_hidden():
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    try:
        yield
    finally:
        if kernels is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels


class _NoHubKernels(importlib.abc.MetaPathFinder):
    """Whoever imports bitsandbytes (PEFT's LoRA dispatch does, for every LoRA model it builds; transformers
    does, to load a 4-bit checkpoint), it runs its import with the `kernels` package hidden.

    Why: on a CPU with AVX512-BF16 (AMX hosts too) bitsandbytes 0.50 calls
    `kernels.get_kernel("kernels-community/quantization-bitsandbytes")` while it is imported. `kernels` is
    installed with transformers, so on a machine with network access that downloads compiled code from the
    Hub and loads it into the process: a remote-code decision nobody took (tunelab runs remote code only when
    the command line says --trust-remote-code). The kernel serves the inference-only layout that
    keep_4bit_layers_trainable() turns off anyway; without `kernels` bitsandbytes takes its own CPU code and
    logs the notice _DropKernelNotice drops. No library offers a switch for this (bitsandbytes reads no
    setting before the call), hence an import hook.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with _kernels_hidden():
                run(module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(finder, _NoHubKernels) for finder in sys.meta_path):
    sys.meta_path.insert(0, _NoHubKernels())


def keep_4bit_layers_trainable(model: nn.Module) -> int:
    """Turn off bitsandbytes' inference-only CPU layout on every 4-bit layer; returns how many were found."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
