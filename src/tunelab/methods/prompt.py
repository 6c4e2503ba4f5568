"""Prompt tuning and prefix tuning, through PEFT: virtual tokens the model attends to, nothing else trains.

- Prompt: n trainable embeddings prepended to every input sequence (Lester et al. 2021).
- Prefix: n trainable key/value pairs prepended to the attention of every layer (Li & Liang 2021).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tunelab.errors import ConfigError
from tunelab.methods.base import MethodSettings
from tunelab.methods.peft_base import PeftMethod, peft_type_of, task_type
from tunelab.methods.bitsandbytes_support import import_peft

if TYPE_CHECKING:
    from torch import nn


class PromptMethod(MethodSettings):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable embeddings prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="Start from random vectors or from init_text's embeddings.")
    init_text: str | None = Field(None, description="With init: text, e.g. 'Classify the sentiment of this review:'.")

    @model_validator(mode="after")
    def _text_needs_text(self) -> PromptMethod:
        if self.init == "text" and not self.init_text:
            raise ValueError("init 'text' needs init_text")
        return self


class PrefixMethod(MethodSettings):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable key/value pairs prepended in every layer.")
    projection: bool = Field(False, description="Reparameterize the prefix through an MLP (Li & Liang 2021); more weights.")


class PromptLearning(PeftMethod):
    """Prompt and prefix tuning: their saved tensor is the virtual-token embedding table itself."""

    peft_type: str  # PEFT's name for the technique, to recognise a backbone that carries it
    merge_refusal = ("its virtual tokens are extra inputs, not a change to any weight: use --format adapter "
                     "(PEFT loads it) or serve the run with `tunelab serve`")

    def blocks_packing(self, backbone: nn.Module) -> bool:
        return peft_type_of(backbone) == self.peft_type

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        if state_dict is None:
            return super().save(backbone, out_dir)
        from safetensors.torch import save_file

        # PEFT (0.21) ignores a given state_dict for prompt learning and reads the embedding from the module,
        # which under FSDP/ZeRO-3 holds a shard. Write the gathered table the way PEFT writes its own.
        key = next(k for k in state_dict if k.endswith("prompt_encoder.default.embedding.weight"))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        backbone.peft_config["default"].save_pretrained(out_dir)
        save_file({"prompt_embeddings": state_dict[key].detach().cpu().contiguous()},
                  Path(out_dir) / "adapter_model.safetensors", metadata={"format": "pt"})


class PromptTuning(PromptLearning):
    name = "prompt"
    config_class = PromptMethod
    peft_type = "PROMPT_TUNING"
    packing_refusal = "PEFT drops position_ids for prompt tuning, so the packed examples would attend to each other"
    # A few thousand weights that must move a frozen model: prompt tuning wants a large rate (Lester et al. 0.3).
    default_lr = 3e-2

    def peft_config(self, backbone: nn.Module, cfg, task: str):
        import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
        from peft import PromptTuningConfig, PromptTuningInit

        text = cfg.init == "text"
        return PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=cfg.init_text if text else None,
            tokenizer_name_or_path=getattr(backbone, "name_or_path", None) if text else None,
            task_type=task_type(task),
        )

    def for_meta_count(self, cfg):
        # A text init would load a tokenizer and embed the text; random init has the same parameter count.
        if cfg.init == "text":
            return self, cfg.model_copy(update={"init": "random", "init_text": None})
        return self, cfg

    def virtual_tokens(self, cfg) -> int:
        return cfg.num_virtual_tokens


class PrefixTuning(PromptLearning):
    name = "prefix"
    config_class = PrefixMethod
    peft_type = "PREFIX_TUNING"
    packing_refusal = "prefix tuning's key/value cache turns off the packed-sequence attention mask"
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

    def peft_config(self, backbone: nn.Module, cfg, task: str):
        import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.projection,
            task_type=task_type(task),
        )

    def prefix_tokens(self, cfg) -> int:
        return cfg.num_virtual_tokens
