"""bitsandbytes is imported only by QLoRA and 8-bit AdamW, says nothing it should not, and QLoRA stays correct.

See src/tunelab/methods/bitsandbytes_support.py for the three problems these tests pin down.
"""

import subprocess
import sys

import pytest
import torch

from tunelab.config import validate_config
from tunelab.methods import count_parameters, get_method
from tunelab.methods.bitsandbytes_support import keep_4bit_layers_trainable
from tunelab.models.loading import load_task_model

from conftest import make_config

bnb = pytest.importorskip("bitsandbytes")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_bitsandbytes_is_imported_only_on_demand_quietly_and_still_usable():
    proc = _python(
        "import sys\n"
        # Everything `tunelab train`, `predict` and `plan` import for a full fine-tuning or LoRA run.
        "import tunelab.cli, tunelab.methods, tunelab.train.loop, tunelab.inference.trained, tunelab.plan\n"
        "print('bitsandbytes' in sys.modules)\n"
        "from tunelab.methods.bitsandbytes_support import import_bitsandbytes\n"
        "from peft import import_utils\n"
        "from transformers.utils import import_utils as hf\n"
        "bnb = import_bitsandbytes()\n"
        "print(import_utils.is_bnb_available(), import_utils.is_bnb_4bit_available(), hf.is_bitsandbytes_available(),"
        " hasattr(bnb.optim, 'AdamW8bit'))\n"
    )
    assert proc.returncode == 0, proc.stderr
    # Not imported before QLoRA asks; then PEFT and transformers must see it again (QLoRA dispatches on these).
    assert proc.stdout.split() == ["False", "True", "True", "True", "True"]
    assert "kernels-community" not in proc.stderr


def _linear4bit(weight: torch.Tensor):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def _input_grad_after_an_evaluation(layer, x: torch.Tensor):
    layer.eval()
    with torch.no_grad():
        layer(x)  # on an AVX512-BF16 CPU, bitsandbytes would switch to its inference-only layout here
    layer.train()
    x = x.clone().requires_grad_(True)
    layer(x).pow(2).sum().backward()
    return x.grad


def test_4bit_layers_keep_their_gradient_after_an_evaluation():
    torch.manual_seed(0)
    weight, x = torch.randn(128, 64), torch.randn(3, 5, 64)
    fresh = _linear4bit(weight)
    x_ref = x.clone().requires_grad_(True)
    fresh(x_ref).pow(2).sum().backward()  # never evaluated: the training path only

    kept = _linear4bit(weight)
    assert keep_4bit_layers_trainable(torch.nn.Sequential(kept)) == 1
    grad = _input_grad_after_an_evaluation(kept, x)
    assert grad is not None and torch.allclose(grad, x_ref.grad, atol=1e-5)

    # Negative control, where the broken path exists: bitsandbytes' own default loses the gradient.
    from bitsandbytes.backends.cpu.ops import has_avx512bf16  # noqa: PLC0415

    if has_avx512bf16():
        with pytest.warns(UserWarning, match="silently incorrect"):
            assert _input_grad_after_an_evaluation(_linear4bit(weight), x) is None


def _built(tiny_decoder, method: dict):
    cfg = validate_config(make_config(task="instruction", model={"name": tiny_decoder}, method=method))
    technique = get_method(cfg.method.name)
    model, _, _ = load_task_model(cfg.model, cfg.task, num_labels=2,
                                  pretrained_kwargs=technique.pretrained_kwargs(cfg.method, "fp32"))
    model.backbone = technique.apply(model.backbone, cfg.method, cfg.task)
    return model


def test_qlora_counts_logical_parameters_like_lora(tiny_decoder):
    lora = _built(tiny_decoder, {"name": "lora", "rank": 4})
    qlora = _built(tiny_decoder, {"name": "qlora", "rank": 4})
    assert any(type(m).__name__ == "Linear4bit" for m in qlora.modules()), "the base was not quantized"
    # The same adapters on the same model: the same share, whatever the storage of the frozen weights.
    assert count_parameters(qlora) == count_parameters(lora)
    # and QLoRA's layers were made safe to evaluate mid-run
    assert all(not m.support_avx512bf16_for_cpu for m in qlora.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


# Runs in a fresh interpreter: bitsandbytes asks its native library at import time whether the CPU has
# AVX512-BF16, and only then reaches for the Hub kernel. The hook answers yes on any host (both branches run
# everywhere), and a stand-in kernels.get_kernel records whether bitsandbytes asked it for code.
_HUB_KERNEL_PROBE = """
import importlib.abc, importlib.util, sys
import kernels
asked = []
def get_kernel(repo, **kwargs):
    asked.append(repo)
    raise RuntimeError("stand-in: nothing is downloaded")
kernels.get_kernel = get_kernel
fake = kernels

class AVX512BF16Host(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.backends.cpu.ops":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            importlib.import_module("bitsandbytes.functional").has_avx512bf16 = lambda: True
            run(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AVX512BF16Host())
if GUARDED:
    import tunelab.methods  # every tunelab command imports this before anything can import bitsandbytes
from peft.tuners.lora import bnb as _peft_bnb  # what PEFT runs for every LoRA model it builds
import bitsandbytes as bnb
print(asked, sys.modules["kernels"] is fake, hasattr(bnb.nn, "Linear4bit"))
"""


@pytest.mark.parametrize("guarded", [True, False])
def test_no_hub_kernel_is_fetched_when_bitsandbytes_is_imported(guarded):
    """On an AVX512-BF16/AMX CPU bitsandbytes 0.50 would download and load a compiled kernel from the Hub while
    it imports (kernels.get_kernel), and PEFT imports it for every LoRA model. In a process that imported
    tunelab it is never asked; without tunelab (the negative control) it is, which also shows the probe
    really puts bitsandbytes on that path."""
    pytest.importorskip("kernels")  # installed with transformers; without it there is nothing to fetch with
    proc = _python(f"GUARDED = {guarded}\n" + _HUB_KERNEL_PROBE)
    assert proc.returncode == 0, proc.stderr
    if guarded:
        assert proc.stdout.split() == ["[]", "True", "True"]  # not asked; `kernels` given back afterwards
        assert "kernels-community" not in proc.stderr  # the fallback notice is dropped too
    else:
        assert proc.stdout.split() == ["['kernels-community/quantization-bitsandbytes']", "True", "True"]

