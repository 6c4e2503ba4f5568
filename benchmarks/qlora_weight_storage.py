"""Bytes the SmolLM2 weights take in fp32 and as bitsandbytes NF4 (double quantization), after loading.

Counts parameter and buffer storage, not process RSS: safetensors maps the fp32 file lazily, so RSS growth
says little about what the weights hold.

    .venv/bin/python benchmarks/qlora_weight_storage.py
"""

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tunelab.models.registry import resolve_model


def storage_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    source = resolve_model("smollm2-135m")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    fp32 = storage_bytes(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32))
    quant = storage_bytes(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, quantization_config=nf4))
    print(f"fp32 {fp32 / 1e9:.3f} GB, nf4 {quant / 1e9:.3f} GB ({fp32 / quant:.1f}x smaller)")


if __name__ == "__main__":
    main()
