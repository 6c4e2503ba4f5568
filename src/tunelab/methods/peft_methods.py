"""The PEFT techniques: LoRA, DoRA, QLoRA, IA3, prompt tuning and prefix tuning.

Each is a thin `Method` that turns our config section into a PEFT config; PEFT does the wrapping, saving
(adapter weights only, as safetensors) and loading. What each one learns:

- LoRA:   h = W x + (alpha / r) * B A x, A (r x d_in) random, B (d_out x r) zero, so step 0 is the base model.
- DoRA:   W' = m * (W + BA) / ||W + BA||_col: LoRA on the direction, plus a learned per-column magnitude m.
- QLoRA:  LoRA on a base whose linear weights are stored as 4-bit NF4 and dequantized per matmul. It saves
          memory on the frozen weights; the dequantization costs time on every step (on CPU as on GPU).
- IA3:    learned vectors rescale keys, values and the FFN input: k' = l_k * k, v' = l_v * v,
          ffn' = W_out (l_ff * act(W_in x)). Initialised to 1, so step 0 is the base model.
- Prompt: n trainable embeddings prepended to every input sequence (Lester et al. 2021).
- Prefix: n trainable key/value pairs prepended to the attention of every layer (Li & Liang 2021).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.methods.bitsandbytes_support import import_bitsandbytes, import_peft, keep_4bit_layers_trainable

import_peft()  # before `from peft import ...`: PEFT on its own would import bitsandbytes for every command
from peft import (  # noqa: E402
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from tunelab.errors import ConfigError  # noqa: E402
from tunelab.methods.base import Method  # noqa: E402


def _task_type(task: str) -> TaskType:
    # Classification pools the backbone's hidden states in our own head, so PEFT sees a feature extractor.
    return TaskType.FEATURE_EXTRACTION if task == "classification" else TaskType.CAUSAL_LM


def _is_checkpointing(backbone: nn.Module) -> bool:
    flag = getattr(backbone, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(flag if flag is not None else getattr(backbone, "is_gradient_checkpointing", False))


class PeftMethod(Method):
    """Shared apply/save/load: subclasses only say which PEFT config to build."""

    def peft_config(self, backbone: nn.Module, cfg, task: str):
        raise NotImplementedError

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        model = get_peft_model(backbone, self.peft_config(backbone, cfg, task))
        if _is_checkpointing(backbone):
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        return model

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        # PEFT picks the adapter's own tensors out of a whole-model state_dict when one is given.
        backbone.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        return PeftModel.from_pretrained(base_backbone, out_dir)


class Lora(PeftMethod):
    name = "lora"
    # Adapters start at zero and have few weights: they want a learning rate ~10x that of full FT.
    default_lr = 5e-4

    def peft_config(self, backbone: nn.Module, cfg, task: str) -> LoraConfig:
        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.use_dora,
            # BERT's pooler is never used by our pooling head: adapting it would only inflate the count.
            exclude_modules=r".*pooler.*" if any("pooler" in n for n, _ in backbone.named_modules()) else None,
            task_type=_task_type(task),
        )


class Dora(Lora):
    name = "dora"


class Qlora(Lora):
    name = "qlora"
    default_lr = 5e-4

    def check(self, cfg, hf_config, task: str) -> None:
        try:
            import_bitsandbytes()
        except ImportError:
            raise ConfigError("method 'qlora' needs bitsandbytes (pip install bitsandbytes>=0.45)") from None

    def pretrained_kwargs(self, cfg, precision: str) -> dict:
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
        # Casts the remaining (norm, embedding) weights to fp32 and makes the input require grad; checkpointing
        # stays whatever model.gradient_checkpointing chose (PEFT would turn it on by default, slowing every step).
        backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=_is_checkpointing(backbone))
        model = super().apply(backbone, cfg, task)
        keep_4bit_layers_trainable(model)  # else an evaluation breaks the gradients of later steps on some CPUs
        return model

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        model = super().load(base_backbone, out_dir)
        keep_4bit_layers_trainable(model)  # eval, predict and generate then compute what training computed
        return model


class Ia3(PeftMethod):
    name = "ia3"
    # IA3's vectors start at 1 and scale activations multiplicatively: the paper trains them at 3e-3.
    default_lr = 3e-3

    def peft_config(self, backbone: nn.Module, cfg, task: str) -> IA3Config:
        return IA3Config(
            target_modules=cfg.target_modules,
            feedforward_modules=cfg.feedforward_modules,
            task_type=_task_type(task),
        )


class PromptLearning(PeftMethod):
    """Prompt and prefix tuning: their saved tensor is the virtual-token embedding table itself."""

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        if state_dict is None:
            return super().save(backbone, out_dir)
        # PEFT (0.21) ignores a given state_dict for prompt learning and reads the embedding from the module,
        # which under FSDP/ZeRO-3 holds a shard. Write the gathered table the way PEFT writes its own.
        key = next(k for k in state_dict if k.endswith("prompt_encoder.default.embedding.weight"))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        backbone.peft_config["default"].save_pretrained(out_dir)
        save_file({"prompt_embeddings": state_dict[key].detach().cpu().contiguous()},
                  Path(out_dir) / "adapter_model.safetensors", metadata={"format": "pt"})


class PromptTuning(PromptLearning):
    name = "prompt"
    # A few thousand weights that must move a frozen model: prompt tuning wants a large rate (Lester et al. 0.3).
    default_lr = 3e-2

    def peft_config(self, backbone: nn.Module, cfg, task: str) -> PromptTuningConfig:
        text = cfg.init == "text"
        return PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=cfg.init_text if text else None,
            tokenizer_name_or_path=getattr(backbone, "name_or_path", None) if text else None,
            task_type=_task_type(task),
        )


class PrefixTuning(PromptLearning):
    name = "prefix"
    default_lr = 1e-2

    def learning_rate(self, cfg) -> float:
        # With projection the prefix comes out of a ~2M-weight MLP: at 1e-2 it collapsed to the majority class
        # on SST-2 (examples/intermediate/prompt-tuning); Li & Liang trained it at 5e-5 to 8e-5 on GPT-2.
        return 1e-3 if cfg.projection else self.default_lr

    def check_sharded_save(self, cfg) -> None:
        if cfg.projection:
            # What PEFT saves then is the projection MLP's output, computed by a forward that every shard
            # holder would have to join; the embedding table alone does not rebuild it.
            raise ConfigError("method.projection: prefix tuning with a projection cannot be saved from FSDP/ZeRO-3 "
                              "shards yet; set method.projection=false or launch with DDP")

    def check(self, cfg, hf_config, task: str) -> None:
        if getattr(hf_config, "model_type", "") in {"gemma2", "gemma3"}:
            raise ConfigError(f"method 'prefix' does not support model type '{hf_config.model_type}' (sliding-window cache)")

    def peft_config(self, backbone: nn.Module, cfg, task: str) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.projection,
            task_type=_task_type(task),
        )
