"""LoRA and its variants DoRA and QLoRA, through PEFT.

- LoRA:   h = W x + (alpha / r) * B A x, A (r x d_in) random, B (d_out x r) zero, so step 0 is the base model.
- DoRA:   W' = m * (W + BA) / ||W + BA||_col: LoRA on the direction, plus a learned per-column magnitude m.
- QLoRA:  LoRA on a base whose linear weights are stored as 4-bit NF4 and dequantized per matmul. It saves
          memory on the frozen weights; the dequantization costs time on every step (on CPU as on GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tunelab.errors import ConfigError
from tunelab.methods.base import ActivationCost, MethodSettings
from tunelab.methods.peft_base import PeftMethod, is_checkpointing, merge_in_fp64, task_type
from tunelab.methods.bitsandbytes_support import import_bitsandbytes, import_peft, keep_4bit_layers_trainable

if TYPE_CHECKING:
    from torch import nn

# bitsandbytes 4-bit: 4 bits per weight, one absmax per block of 64. Without double quantization the absmax is
# fp32 (4/64 bytes per weight); with it an 8-bit absmax (1/64) plus one fp32 per 256 blocks (4/(64*256)).
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}


class LoraMethod(MethodSettings):
    name: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, description="Rank of the update B@A: higher = more capacity and memory.")
    alpha: float = Field(16, gt=0, description="Scale of the update is alpha/rank.")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the LoRA input. 0 (the default) lets the adapter reuse the input its layer already "
        "keeps for backward; >0 keeps a dropped copy per adapted layer: 1.22x slower and a 25% higher peak on "
        "SmolLM2 for the same perplexity (docs/09-optimization.md). Raise it when a long run overfits.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear for every linear layer but the output."
    )
    use_dora: bool = Field(False, description="DoRA: learn magnitude and direction apart; slower per step.")


class DoraMethod(LoraMethod):
    """LoRA with the weight split into magnitude and direction (Liu et al. 2024): `lora` with use_dora on."""

    name: Literal["dora"] = "dora"  # type: ignore[assignment]
    use_dora: Literal[True] = Field(True, description="Always on for dora.")


class QloraMethod(LoraMethod):
    """LoRA on a base whose linear layers are stored in 4 bits (Dettmers et al. 2023)."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too: ~0.4 bits/weight saved.")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for each matmul; auto = the run's precision."
    )


class Lora(PeftMethod):
    name = "lora"
    config_class = LoraMethod
    # Adapters start at zero and have few weights: they want a learning rate ~10x that of full FT.
    default_lr = 5e-4

    def peft_config(self, backbone: nn.Module, cfg, task: str):
        import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
        from peft import LoraConfig

        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.use_dora,
            # BERT's pooler is never used by our pooling head: adapting it would only inflate the count.
            exclude_modules=r".*pooler.*" if any("pooler" in n for n, _ in backbone.named_modules()) else None,
            task_type=task_type(task),
        )

    def activation_cost(self, module: nn.Module, cfg) -> ActivationCost | None:
        """A PEFT LoRA layer (it has lora_A beside its base_layer): base output, B A x and its scaled copy are
        freed once summed; input dropout keeps a dropped copy of x and its mask; DoRA keeps the base output
        and the LoRA output for its norm."""
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(module.lora_A)):
            return None
        d_in, d_out = module.base_layer.in_features, module.base_layer.out_features
        cost = ActivationCost(transient=3 * d_out)
        if cfg.dropout > 0:  # dropout(x) is a new tensor that lora_A saves, with its mask
            cost.kept += d_in
            cost.masks += d_in
        if cfg.use_dora:
            cost.kept += 2 * d_out
            cost.transient += 2 * d_out
        return cost


class Dora(Lora):
    name = "dora"
    config_class = DoraMethod


class Qlora(Lora):
    name = "qlora"
    config_class = QloraMethod
    default_lr = 5e-4

    def check(self, cfg, hf_config, task: str) -> None:
        try:
            import_bitsandbytes()
        except ImportError:
            raise ConfigError("method 'qlora' needs bitsandbytes (pip install bitsandbytes>=0.45)") from None

    def pretrained_kwargs(self, cfg, precision: str) -> dict:
        import torch
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        dtype = precision if cfg.compute_dtype == "auto" else cfg.compute_dtype
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
        )
        # Quantized weights are placed at load time and cannot be moved afterwards: put them on this rank's device.
        return {"quantization_config": quant, "device_map": {"": PartialState().device}}

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
        from peft import prepare_model_for_kbit_training

        # Casts the remaining (norm, embedding) weights to fp32 and makes the input require grad; checkpointing
        # stays whatever model.gradient_checkpointing chose (PEFT would turn it on by default, slowing every step).
        backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=is_checkpointing(backbone))
        model = super().apply(backbone, cfg, task)
        keep_4bit_layers_trainable(model)  # else an evaluation breaks the gradients of later steps on some CPUs
        return model

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        model = super().load(base_backbone, out_dir)
        keep_4bit_layers_trainable(model)  # eval, predict and generate then compute what training computed
        return model

    def for_meta_count(self, cfg):
        # Nothing to quantize on the meta device: plain LoRA adds the same adapters, so the same count; the
        # 4-bit base weights are priced through quantized_weight_bytes.
        return Lora(), cfg

    def quantized_weight_bytes(self, cfg) -> float:
        return NF4_BYTES[cfg.double_quant]

    def merged(self, backbone: nn.Module, saved_dir: Path) -> nn.Module:
        """LoRA merged into a *dequantized* base: every 4-bit weight becomes the fp32 matrix bitsandbytes
        multiplied with in training (dequantize_4bit), then B A is added in fp64 and the sum rounded to fp32 once
        (merge_in_fp64).

        The two other ways lose the training: PEFT's merge into the 4-bit layers rounds W + BA back to 4 bits
        (the update is mostly smaller than one 4-bit step), and merging into the original full-precision base
        gives a model nobody trained -- the adapter learned to correct the 4-bit weights, not those.
        """
        import torch
        from peft import PeftModel

        bnb = import_bitsandbytes()
        base = backbone.unload()  # the 4-bit base without the LoRA wrappers (nothing merged)
        weights = {}
        for name, module in base.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                weights[prefix + "weight"] = weight.to(torch.float32)
                if module.bias is not None:
                    weights[prefix + "bias"] = module.bias.detach().to(torch.float32)
                continue
            for pname, p in module.named_parameters(recurse=False):
                weights[prefix + pname] = p.detach().to(torch.float32)
        config = base.config.__class__.from_dict({k: v for k, v in base.config.to_dict().items()
                                                  if k != "quantization_config"})
        plain = type(base)(config).to(torch.float32)
        missing, unexpected = plain.load_state_dict(weights, strict=False)
        tied = set(getattr(plain, "_tied_weights_keys", None) or [])
        untied = [k for k in missing if k not in tied and "lm_head" not in k]
        if untied or unexpected:
            raise ValueError(f"dequantized base does not match its architecture: missing {untied[:3]}, "
                             f"unexpected {unexpected[:3]}")
        plain.tie_weights()
        return merge_in_fp64(PeftModel.from_pretrained(plain.eval(), saved_dir))
