"""What the estimate knows about the model: its shape (Architecture) and exact parameter counts, from a
meta-device model with the technique applied."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from tunelab.config import RunConfig


@dataclass
class Architecture:
    """The numbers the activation and FLOP formulas need, read from the HF config and the meta model."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # width of K (and of V): kv_heads x head_dim, < hidden under grouped-query attention
    vocab: int
    gated_mlp: bool  # SwiGLU-style (gate, up, down) as in Llama, vs. a plain two-layer FFN as in BERT
    python_rmsnorm: bool  # transformers' RMSNorm (Llama) saves its input and the normalized copy
    decoder: bool
    attention_dropout: float
    hidden_dropout: float


def _first(config, *keys, default=None):
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return default


def read_architecture(hf_config, model_cfg, modules: list[tuple[str, object]] | None = None) -> Architecture:
    from tunelab.models.loading import is_decoder

    hidden = _first(hf_config, "hidden_size", "n_embd", "d_model")
    heads = _first(hf_config, "num_attention_heads", "n_head")
    head_dim = _first(hf_config, "head_dim", default=hidden // heads)
    kv_heads = _first(hf_config, "num_key_value_heads", default=heads)
    names = [name for name, _ in modules or []]
    kinds = {type(m).__name__ for _, m in modules or []}
    # Dropout the run will really use: model.dropout overrides every dropout key (see loading._dropout_kwargs).
    if model_cfg.dropout is not None:
        attn_p = hidden_p = model_cfg.dropout
    else:
        attn_p = _first(hf_config, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", default=0.0)
        hidden_p = _first(hf_config, "hidden_dropout_prob", "hidden_dropout", "resid_pdrop", default=0.0)
    return Architecture(
        model_type=getattr(hf_config, "model_type", "?"),
        layers=_first(hf_config, "num_hidden_layers", "n_layer"),
        hidden=hidden,
        intermediate=_first(hf_config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=hf_config.vocab_size,
        gated_mlp=any(n.endswith("gate_proj") for n in names),
        python_rmsnorm=any("RMSNorm" in k for k in kinds),
        decoder=is_decoder(hf_config),
        attention_dropout=float(attn_p or 0.0),
        hidden_dropout=float(hidden_p or 0.0),
    )


# ------------------------------------------------------------------------------------------ parameters


@dataclass
class ParameterCounts:
    total: int = 0
    trainable: int = 0
    quantized: int = 0  # QLoRA: base linear weights stored in 4 bits
    matmul_body: int = 0  # weights of the linear layers every token goes through (FLOPs), LM head excluded
    lm_head: int = 0  # vocab x hidden for language models
    lm_head_trainable: int = 0
    trainable_matmul: int = 0  # trainable weights that a matmul uses (their gradient costs 2 FLOPs each)
    linear_weights: int = 0  # unquantized linear weights (autocast keeps a 16-bit copy of each)
    # Extra elements per token per layer that the technique makes autograd keep (LoRA's dropout copies, ...)
    method_activation_elements: float = 0.0
    method_activation_masks: float = 0.0  # of which this many come with a 1-byte dropout mask
    # Elements per token per layer that the technique allocates and frees within the forward pass
    method_transient_elements: float = 0.0
    virtual_tokens: int = 0  # prompt tuning: prepended to every row
    prefix_tokens: int = 0  # prefix tuning: extra keys/values in every layer
    source: str = "meta model"
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _without_zero3_init():
    """Under DeepSpeed ZeRO-3, transformers builds every model inside zero.Init, which partitions real
    storage and fails on meta tensors. The estimate wants shapes only: build it as a plain model."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref  # no public getter; set/unset are public
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def _meta_task_model(cfg: RunConfig, hf_config, num_labels: int):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from tunelab.models.task_models import CausalLM, SequenceClassifier

    with torch.device("meta"), _without_zero3_init():
        if cfg.task == "classification":
            backbone = AutoModel.from_config(hf_config)
            return SequenceClassifier(backbone, hf_config.hidden_size, max(num_labels, 2), "mean")
        return CausalLM(AutoModelForCausalLM.from_config(hf_config))


def count_parameters_for(cfg: RunConfig, hf_config, num_labels: int = 2) -> tuple[ParameterCounts, Architecture]:
    """Exact counts from the technique applied to a meta-device model; its formula where that is not possible.

    Everything technique-specific is asked of the technique (methods/base.py: for_meta_count,
    quantized_weight_bytes, activation_cost, virtual_tokens, prefix_tokens, formula_counts).
    """
    from torch import nn

    from tunelab.methods import get_method

    technique = get_method(cfg.method.name)
    model = _meta_task_model(cfg, hf_config, num_labels)
    backbone = model.backbone
    out_emb = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    counts = ParameterCounts()
    base_linear = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and m is not out_emb]
    arch = read_architecture(hf_config, cfg.model, list(backbone.named_modules()))
    base_linear_weights = sum(m.weight.numel() for _, m in base_linear)
    counts.quantized = base_linear_weights if technique.quantized_weight_bytes(cfg.method) else 0
    counts.matmul_body = base_linear_weights
    if hasattr(model, "head"):  # the classification head: one matmul per row, counted per token (tiny)
        counts.matmul_body += model.head.weight.numel()
    counts.lm_head = out_emb.weight.numel() if out_emb is not None else 0
    counts.virtual_tokens = technique.virtual_tokens(cfg.method)
    counts.prefix_tokens = technique.prefix_tokens(cfg.method)

    counting, counting_cfg = technique.for_meta_count(cfg.method)
    try:
        with _without_zero3_init():
            model.backbone = counting.apply(backbone, counting_cfg, cfg.task)
    except Exception as err:  # a technique that cannot run on meta tensors: count by formula, say so
        counts.notes.append(f"trainable parameters by formula ({cfg.method.name} on the meta device: {err})")
        return _formula_counts(cfg, technique, arch, model, counts), arch
    _count_applied(cfg, technique, model, out_emb, counts, arch.layers)
    # Linear layers the technique added (LoRA's A and B, adapters' bottlenecks) run for every token too.
    counts.matmul_body += counts.linear_weights + counts.quantized - base_linear_weights
    return counts, arch


def _count_applied(cfg: RunConfig, technique, model, out_emb, counts: ParameterCounts, layers: int) -> None:
    """Fill `counts` from a task model the technique has been applied to."""
    from torch import nn

    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts.total += p.numel()
        if p.requires_grad:
            counts.trainable += p.numel()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    counts.linear_weights = 0
    kept, masks, transient = 0.0, 0.0, 0.0
    for m in model.backbone.modules():
        if isinstance(m, nn.Linear) and m is not out_emb:
            if m.weight.requires_grad and id(m.weight) not in embeddings:
                counts.trainable_matmul += m.weight.numel()
            counts.linear_weights += m.weight.numel()
        cost = technique.activation_cost(m, cfg.method)
        if cost is not None:
            kept, masks, transient = kept + cost.kept, masks + cost.masks, transient + cost.transient
    if out_emb is not None:
        counts.lm_head_trainable = out_emb.weight.numel() if out_emb.weight.requires_grad else 0
    counts.method_activation_elements = kept / layers
    counts.method_activation_masks = masks / layers
    counts.method_transient_elements = transient / layers
    counts.linear_weights -= counts.quantized  # quantized weights are dequantized per matmul, not cast once


def _formula_counts(cfg: RunConfig, technique, arch: Architecture, model, counts: ParameterCounts) -> ParameterCounts:
    """A technique that cannot run on meta tensors (e.g. composing adapters of other runs, which loads their
    weights): its own formula, or the head alone when it has none."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    head = model.head.weight.numel() + model.head.bias.numel() if hasattr(model, "head") else 0
    formula = technique.formula_counts(cfg.method, arch.hidden, arch.layers)
    added = 0
    if formula is not None:
        added = formula.added
        counts.method_activation_elements = formula.activation_elements
        counts.method_transient_elements = formula.transient_elements
        counts.trainable_matmul = formula.trainable_matmul
        counts.notes.append(formula.note)
    else:
        counts.notes.append(f"method '{cfg.method.name}' has no parameter formula: trainable parameters counted "
                            "as the head only")
    counts.total = total + added
    counts.trainable = added + head
    counts.linear_weights = counts.matmul_body
    counts.source = "formula"
    return counts
