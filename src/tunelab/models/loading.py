"""Load a tokenizer and a task model from a resolved model name."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from tunelab.config import ModelConfig
from tunelab.errors import ModelError
from tunelab.models.registry import BUNDLED, resolve_model
from tunelab.models.task_models import CausalLM, SequenceClassifier


def quiet_transformers() -> None:
    """Keep the terminal for tunelab's own lines: no per-weight loading bars, no advice-level warnings."""
    import warnings

    import transformers

    # PEFT still reads this renamed transformers attribute; the warning is theirs to fix, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def is_decoder(hf_config: PretrainedConfig) -> bool:
    archs = hf_config.architectures or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(
        getattr(hf_config, "is_decoder", False)
    )


# Config keys that hold a dropout probability, across the common architectures.
DROPOUT_KEYS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout", "dropout",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout",
)


def _dropout_kwargs(cfg: ModelConfig, hf_config: PretrainedConfig) -> dict:
    if cfg.dropout is None:
        return {}
    return {k: cfg.dropout for k in DROPOUT_KEYS if hasattr(hf_config, k)}


def _pretrained_kwargs(cfg: ModelConfig) -> dict:
    return {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}


def check_attention(kind: str) -> None:
    if kind != "flash_attention_2":
        return
    import importlib.util

    if not torch.cuda.is_available():
        raise ModelError("model.attention: flash_attention_2 runs on CUDA GPUs only; use auto (SDPA) here")
    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attention: flash_attention_2 needs the flash-attn package (pip install flash-attn)")


def load_hf_config(cfg: ModelConfig) -> tuple[str, PretrainedConfig]:
    source = resolve_model(cfg.name)
    try:
        return source, AutoConfig.from_pretrained(source, **_pretrained_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load model '{cfg.name}' ({str(err).splitlines()[0]}); bundled models: {', '.join(BUNDLED)}"
        ) from None


def load_tokenizer(source: str | Path, cfg: ModelConfig):
    tokenizer = AutoTokenizer.from_pretrained(source, **_pretrained_kwargs(cfg))
    if tokenizer.pad_token_id is None:
        # Only used to fill inputs; labels never use it (see CausalLM), so sharing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_task_model(cfg: ModelConfig, task: str, num_labels: int = 0, pretrained_kwargs: dict | None = None,
                    backbone: nn.Module | None = None):
    """Return (task_model, tokenizer, source) with the pretrained base weights.

    pretrained_kwargs come from the technique (QLoRA's 4-bit quantization config).
    backbone: the pretrained backbone, already loaded, to wrap instead of loading it again (`tunelab serve`
    builds every run that shares a base on one copy of its weights).
    """
    source, hf_config = load_hf_config(cfg)
    decoder = is_decoder(hf_config)
    tokenizer = load_tokenizer(source, cfg)
    # fp32 master weights whatever dtype the checkpoint was saved in: mixed precision is autocast's job,
    # and AdamW moments in bf16 lose small updates.
    kwargs = {
        **_pretrained_kwargs(cfg), **_dropout_kwargs(cfg, hf_config), "dtype": torch.float32, **(pretrained_kwargs or {})
    }
    if cfg.attention != "auto":
        check_attention(cfg.attention)
        kwargs["attn_implementation"] = cfg.attention
    if task == "classification":
        backbone = backbone if backbone is not None else AutoModel.from_pretrained(source, **kwargs)
        pooling = cfg.pooling if cfg.pooling != "auto" else ("last" if decoder else "mean")
        if pooling == "last" and tokenizer.padding_side != "right":
            raise ModelError("pooling 'last' needs right padding")
        head_dropout = 0.1 if cfg.dropout is None else cfg.dropout
        model: nn.Module = SequenceClassifier(backbone, hf_config.hidden_size, num_labels, pooling, head_dropout)
    else:
        if not decoder:
            raise ModelError(
                f"task '{task}' needs a decoder (causal) model, but '{cfg.name}' is an encoder; "
                "use smollm2-135m or another *ForCausalLM model"
            )
        model = CausalLM(backbone if backbone is not None else AutoModelForCausalLM.from_pretrained(source, **kwargs))
    if cfg.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, source
