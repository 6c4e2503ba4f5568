"""LoRA from scratch: the layer guide 03 reads, checked against PEFT's LoRA layer by tests/test_lora_from_scratch.py.

    .venv/bin/python examples/intermediate/lora/lora_from_scratch.py

builds this layer and PEFT's around the same frozen weight with the same A and B, and prints how far apart their
outputs and gradients are (float rounding only).
"""

import torch
from torch import nn


# --8<-- [start:lora-linear]
class LoRALinear(nn.Module):
    """h = W x + (alpha / r) * B A x, with W frozen and only A and B trained."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16):
        super().__init__()
        self.base = base.requires_grad_(False)                      # W (and its bias): frozen
        self.A = nn.Parameter(torch.empty(rank, base.in_features))  # r x d_in
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # d_out x r, zero: step 0 = the base model
        nn.init.kaiming_uniform_(self.A, a=5**0.5)                  # the same start as nn.Linear and PEFT
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scaling
# --8<-- [end:lora-linear]


def peft_twin(layer: LoRALinear) -> nn.Module:
    """PEFT's LoRA around a copy of the same frozen weight, given this layer's A and B."""
    import copy

    from tunelab.methods.bitsandbytes_support import import_peft

    import_peft()  # PEFT without pulling in bitsandbytes and its notices
    from peft import LoraConfig, get_peft_model

    rank = layer.A.shape[0]
    host = nn.Sequential()
    host.add_module("proj", copy.deepcopy(layer.base))
    model = get_peft_model(host, LoraConfig(r=rank, lora_alpha=layer.scaling * rank, target_modules=["proj"]))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.A)
        lora.lora_B["default"].weight.copy_(layer.B)
    return model


if __name__ == "__main__":
    torch.manual_seed(0)
    ours = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
    with torch.no_grad():
        ours.B.normal_()  # as if trained: a zero B would make both layers equal to the base trivially
    theirs = peft_twin(ours)
    x = torch.randn(5, 64)
    out_ours, out_peft = ours(x), theirs(x)
    out_ours.pow(2).sum().backward()
    out_peft.pow(2).sum().backward()
    peft_layer = theirs.base_model.model.proj
    print("max |output difference|      ", (out_ours - out_peft).abs().max().item())
    print("max |grad A difference|      ", (ours.A.grad - peft_layer.lora_A["default"].weight.grad).abs().max().item())
    print("max |grad B difference|      ", (ours.B.grad - peft_layer.lora_B["default"].weight.grad).abs().max().item())
