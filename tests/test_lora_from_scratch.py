"""Guide 03's from-scratch LoRALinear is the code in examples/intermediate/lora/lora_from_scratch.py, and it
computes what PEFT's LoRA layer computes: the same output and the same gradients for the same W, A and B."""

import importlib.util
import re

import pytest
import torch
from torch import nn

from conftest import REPO

EXAMPLE = REPO / "examples" / "intermediate" / "lora" / "lora_from_scratch.py"


@pytest.fixture(scope="module")
def lora():
    spec = importlib.util.spec_from_file_location("lora_from_scratch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trained_pair(lora, rank=4, alpha=8.0, seed=0):
    torch.manual_seed(seed)
    ours = lora.LoRALinear(nn.Linear(48, 24), rank=rank, alpha=alpha)
    with torch.no_grad():
        ours.B.normal_()  # as if trained: with B = 0 both would equal the base layer trivially
    return ours, lora.peft_twin(ours)


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 8.0), (8, 32.0)])
def test_same_output_and_gradients_as_peft(lora, rank, alpha):
    ours, theirs = _trained_pair(lora, rank, alpha)
    peft_layer = theirs.base_model.model.proj
    x = torch.randn(3, 7, 48)
    out_ours, out_peft = ours(x), theirs(x)
    assert torch.allclose(out_ours, out_peft, atol=1e-6)
    out_ours.pow(2).sum().backward()
    out_peft.pow(2).sum().backward()
    assert torch.allclose(ours.A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-5)
    assert torch.allclose(ours.B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-5)
    # Only A and B train, in both.
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["A", "B"]
    assert ours.base.weight.grad is None and peft_layer.base_layer.weight.grad is None


def test_a_different_scale_is_caught(lora):
    ours, theirs = _trained_pair(lora, 4, 8.0)
    ours.scaling *= 2  # negative control: the comparison would see a wrong alpha / rank
    x = torch.randn(2, 48)
    assert not torch.allclose(ours(x), theirs(x), atol=1e-3)


def test_starts_as_the_base_layer(lora):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = lora.LoRALinear(base, rank=2)
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), base(x))


def test_guide_shows_exactly_the_tested_code():
    source = EXAMPLE.read_text()
    tested = re.search(r"# --8<-- \[start:lora-linear\]\n(.*?)# --8<-- \[end:lora-linear\]", source, re.S).group(1)
    guide = (REPO / "docs" / "03-lora.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert tested in blocks, "docs/03-lora.md must quote LoRALinear exactly as examples/intermediate/lora/lora_from_scratch.py has it"
