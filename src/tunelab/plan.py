"""Preflight estimate of a run: peak memory, split by what holds it, and FLOPs per token, before any weight loads.

    est = estimate(load_config("configs/smollm2-alpaca-lora.yaml"))
    print(format_plan(est))

Parameter counts are exact: the model is built on the meta device (shapes, no storage) from its config and
the technique is applied to it, so LoRA's rank, IA3's targets or prefix tuning's virtual tokens are counted
as the run will count them. Sequence shapes are exact too when the data can be read: the training set is
tokenized and cut into the same batch plan the loop uses, and the largest micro-batch the run will see sets
the activation memory. What remains is a model of what autograd keeps, written below term by term.

Memory at the peak of a training step (the start of backward, when every saved activation is still alive):

    weights      every parameter at its storage size: fp32 (tunelab keeps fp32 master weights), QLoRA's
                 quantized linear weights at 4 bits plus their quantization constants
    gradients    4 bytes per trainable parameter
    optimizer    AdamW: two fp32 moments per trainable parameter, 8 bytes (2 bytes with train.optimizer=adamw_8bit)
    activations  what autograd saves per layer, see `layer_activation_elements`, times tokens, layers and the
                 element size; plus what the technique adds (LoRA's dropout copies, adapter bottlenecks)
    logits       the LM head's output and its fp32 loss copies, see `logits_bytes`; 0 for classification
    allocator    CPU only: freed memory glibc keeps mapped (see CPU_HEAP_SLACK_*), part of RSS but of no tensor
    runtime      the process before any tensor: Python, torch, transformers, the tokenizer (CPU RSS); on a
                 GPU the CUDA context instead, which torch.cuda.max_memory_allocated does not see

Evaluation passes (the untuned baseline, periodic validation) hold weights, optimizer state and inference
activations; `peak_memory_bytes` is the larger of the two phases, in the units tunelab measures its runs in
(process RSS on CPU, allocated tensor bytes on CUDA).

Calibration: estimate vs. measured train.peak_memory_bytes (process RSS), 3-step runs of the bundled configs
with data.max_train_samples=64 on a 2-core AVX2 CPU, fp32, torch 2.13, chunked LM loss:

    run                                        estimate   measured   ratio
    minilm-l6 LoRA   (examples/beginner/lora)   1.65 GB    1.91 GB   0.87
    minilm-l6 full   (.../full-fine-tuning)     1.31 GB    1.43 GB   0.91
    smollm2 LoRA     (configs/smollm2-alpaca)   9.16 GB    8.38 GB   1.09
    smollm2 full     (same, method full)        6.41 GB    5.50 GB   1.16
    smollm2 LoRA + gradient checkpointing       4.51 GB    4.40 GB   1.03

The full-logits loss path (before task_models.lm_loss_sum) against the earlier runs/smollm2-alpaca, 30 steps:
10.63 GB estimated, 10.59 GB measured, of which logits 1.6 GB, activations 4.5 GB and allocator slack 3.3 GB.
Longer runs grow the CPU slack a little (lora-imdb, 125 steps: 1.65 vs 2.03 GB, 0.82). Not yet checked
against a GPU or a bf16 run.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from tunelab.config import RunConfig

GB = 1e9

# Process RSS before any model tensor on CPU: the training stack's imports (torch, transformers, PEFT,
# accelerate, tunelab's loop) measured 0.54 GB (Linux, torch 2.13 CPU); the tokenizer and data add a little.
CPU_RUNTIME_BYTES = int(0.6 * GB)
# A CUDA context with torch's kernels loaded: ~0.5 GB on recent drivers (nvidia-smi, before any tensor).
CUDA_CONTEXT_BYTES = int(0.5 * GB)

# CPU only: glibc malloc keeps the heap holes that tensors freed during the forward pass leave between the
# tensors autograd saves (blocks under its mmap threshold, which grows to 32 MB after the first large free,
# come from the heap and are not returned). RSS therefore exceeds the live tensors by a share of the forward
# pass's temporaries. Measured against a run with MALLOC_MMAP_THRESHOLD_=131072 (which returns every freed
# block): ~10% of the activations for full fine-tuning; 0.75 of the temporaries LoRA's wrapped layers make.
CPU_HEAP_SLACK_OF_ACTIVATIONS = 0.10
CPU_HEAP_SLACK_OF_TRANSIENTS = 0.75

ADAM_BYTES_PER_PARAM = 8  # exp_avg and exp_avg_sq, fp32 whatever the run's precision
ADAM_8BIT_BYTES_PER_PARAM = 2  # bitsandbytes' 8-bit moments (block scales add ~0.03 bytes)
GRAD_BYTES_PER_PARAM = 4  # gradients have their parameter's dtype, fp32 here
MASK_BYTES = 1  # dropout keeps a bool mask per element

# bitsandbytes 4-bit: 4 bits per weight, one absmax per block of 64. Without double quantization the absmax is
# fp32 (4/64 bytes per weight); with it an 8-bit absmax (1/64) plus one fp32 per 256 blocks (4/(64*256)).
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}


def _elem_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# ------------------------------------------------------------------------------------------ model shape


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


def _method_for_counting(cfg: RunConfig):
    """The registered technique and a config copy safe to apply on the meta device (prompt tuning's text init
    would load a tokenizer and embed text: random init has the same parameter count)."""
    from tunelab.methods import METHODS

    method = METHODS.get(cfg.method.name)
    method_cfg = cfg.method
    if cfg.method.name == "prompt" and cfg.method.init == "text":
        method_cfg = cfg.method.model_copy(update={"init": "random", "init_text": None})
    if method is not None and cfg.method.name == "qlora":
        # Nothing to quantize on the meta device: apply plain LoRA (same adapters, same count); the 4-bit base
        # weights are priced by estimate().
        method = METHODS.get("lora", method)
    return method, method_cfg


def count_parameters_for(cfg: RunConfig, hf_config, num_labels: int = 2) -> tuple[ParameterCounts, Architecture]:
    """Exact counts from the technique applied to a meta-device model; a formula where that is not possible."""
    from torch import nn

    model = _meta_task_model(cfg, hf_config, num_labels)
    backbone = model.backbone
    out_emb = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    counts = ParameterCounts()
    base_linear = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and m is not out_emb]
    arch = read_architecture(hf_config, cfg.model, list(backbone.named_modules()))
    counts.quantized = sum(m.weight.numel() for _, m in base_linear) if cfg.method.name == "qlora" else 0
    counts.matmul_body = sum(m.weight.numel() for _, m in base_linear)
    if hasattr(model, "head"):  # the classification head: one matmul per row, counted per token (tiny)
        counts.matmul_body += model.head.weight.numel()
    counts.lm_head = out_emb.weight.numel() if out_emb is not None else 0

    method, method_cfg = _method_for_counting(cfg)
    if method is None:
        counts = _formula_counts(cfg, arch, model, counts)
    else:
        try:
            with _without_zero3_init():
                model.backbone = method.apply(backbone, method_cfg, cfg.task)
        except Exception as err:  # a technique that cannot run on meta tensors: count by formula, say so
            counts.notes.append(f"trainable parameters by formula ({cfg.method.name} on the meta device: {err})")
            counts = _formula_counts(cfg, arch, model, counts)
        else:
            base_linear_weights = sum(m.weight.numel() for _, m in base_linear)
            _count_applied(cfg, model, out_emb, counts, arch.layers)
            # Linear layers the technique added (LoRA's A and B, adapters' bottlenecks) run for every token too.
            counts.matmul_body += counts.linear_weights + counts.quantized - base_linear_weights
    return counts, arch


def _count_applied(cfg: RunConfig, model, out_emb, counts: ParameterCounts, layers: int) -> None:
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
    lora_dropout = float(getattr(cfg.method, "dropout", 0.0) or 0.0)
    extra, masks, transient = 0.0, 0.0, 0.0
    for m in model.backbone.modules():
        if isinstance(m, nn.Linear) and m is not out_emb:
            if m.weight.requires_grad and id(m.weight) not in embeddings:
                counts.trainable_matmul += m.weight.numel()
            counts.linear_weights += m.weight.numel()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(getattr(m, "lora_A", {})):
            d_in, d_out = m.base_layer.in_features, m.base_layer.out_features
            if lora_dropout > 0:  # dropout(x) is a new tensor that lora_A saves, with its mask
                extra += d_in
                masks += d_in
            transient += 3 * d_out  # base output, B A x, its scaled copy: freed once summed
            if getattr(cfg.method, "use_dora", False):  # DoRA keeps the base output and the LoRA output
                extra += 2 * d_out
                transient += 2 * d_out
        elif hasattr(m, "ia3_l") and hasattr(m, "base_layer") and len(getattr(m, "ia3_l", {})):
            # The scaled tensor is a new one: the FFN input (feedforward modules) or the K/V output.
            feedforward = getattr(m, "is_feedforward", False)
            extra += m.base_layer.in_features if feedforward else m.base_layer.out_features
            transient += 0 if feedforward else m.base_layer.out_features  # the unscaled K/V output
        elif type(m).__name__ == "AdapterPoint":  # methods/adapters.py: bottlenecks beside a sublayer
            for adapter in m.adapters.values():
                hidden, width = adapter.down.in_features, adapter.down.out_features
                extra += hidden + 2 * width  # the adapter's input, its down-projection, the activation
                transient += 2 * hidden  # the up-projection and its scaled copy, freed once added
    if out_emb is not None:
        counts.lm_head_trainable = out_emb.weight.numel() if out_emb.weight.requires_grad else 0
    counts.method_activation_elements = extra / layers
    counts.method_activation_masks = masks / layers
    counts.method_transient_elements = transient / layers
    if cfg.method.name == "prompt":
        counts.virtual_tokens = cfg.method.num_virtual_tokens
    if cfg.method.name == "prefix":
        counts.prefix_tokens = cfg.method.num_virtual_tokens
    if cfg.method.name == "qlora":
        counts.linear_weights -= counts.quantized  # 4-bit weights are dequantized per matmul, not cast once


def _formula_counts(cfg: RunConfig, arch: Architecture, model, counts: ParameterCounts) -> ParameterCounts:
    """Techniques that are not registered (yet) or cannot run on meta tensors.

    The bottleneck adapter has a formula here because it was written alongside this module: when
    methods.METHODS has no "adapter" it is priced as layers x points x (2 h b + b + h). Once registered it is
    counted exactly on the meta device like every other technique, and this branch only serves techniques
    that fail on meta tensors (e.g. composing adapters from other runs, which loads their weights).
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    head = model.head.weight.numel() + model.head.bias.numel() if hasattr(model, "head") else 0
    h, layers = arch.hidden, arch.layers
    if cfg.method.name == "adapter":
        bottleneck = max(1, h // cfg.method.reduction_factor)
        points = 2 if cfg.method.config == "houlsby" else 1
        added = layers * points * (2 * h * bottleneck + bottleneck + h)
        counts.method_activation_elements = points * (h + 2 * bottleneck)  # adapter input, down output, act output
        counts.method_transient_elements = points * 2 * h  # up-projection output and its scaled copy
        counts.trainable_matmul = layers * points * 2 * h * bottleneck
        counts.notes.append(
            "adapter parameters by formula: layers x points x (2 h b + b + h), b = hidden/reduction_factor"
        )
    else:
        added = 0
        counts.notes.append(
            f"method '{cfg.method.name}' not registered: trainable parameters unknown, counted as the head only"
        )
    counts.total = total + added
    counts.trainable = added + head
    counts.linear_weights = counts.matmul_body
    counts.source = "formula"
    return counts


# ------------------------------------------------------------------------------------------ activations


def layer_activation_elements(arch: Architecture, kv_repeated: bool = True) -> float:
    """Elements autograd keeps per token in one transformer block, SDPA attention, no dropout.

    After Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1:
    sbh(34 + 5as/h) bytes per layer at 16 bits with dropout. Re-derived for what PyTorch's SDPA kernels keep
    (no s x s attention scores unless attention dropout is on), without dropout masks, in elements so any
    precision applies, and for gated MLPs and GQA:

        attention  q, k, v and the output as SDPA saves them      2h + 2 kv   (kv = h when transformers
                                                                                repeats the KV heads, which
                                                                                it does whenever a padding
                                                                                mask is passed)
        inputs     of the QKV and the MLP projections              2h
        norms      LayerNorm keeps its input                        1h each (2 per block)
                   transformers' RMSNorm keeps input + normalized   2h each
        MLP        plain: pre-activation, activation               2 I
                   gated: gate, act(gate), up, product             4 I

    MiniLM (BERT, h=384, I=4h): 16h, measured 16.4h. SmolLM2 (Llama, h=576, I=1536): 10h + 4I, measured
    6% less (saved-tensor hooks on one fp32 training step, tensors deduplicated by storage).
    """
    h, inter = arch.hidden, arch.intermediate
    kv = h if kv_repeated else arch.kv_dim
    attention = 2 * h + 2 * kv
    inputs = 2 * h
    norms = (4 if arch.python_rmsnorm else 2) * h
    mlp = (4 if arch.gated_mlp else 2) * inter
    return attention + inputs + norms + mlp


def dropout_bytes_per_token(arch: Architecture, elem: int) -> float:
    """Hidden dropout (after attention and after the MLP) keeps its output and a 1-byte mask per element."""
    if arch.hidden_dropout <= 0:
        return 0.0
    return 2 * arch.hidden * (elem + MASK_BYTES)


def attention_score_bytes_per_row(arch: Architecture, width: int, elem: int) -> float:
    """Attention-probability dropout rules out the fused SDPA kernels: the s x s probabilities, their dropout
    mask and the dropped copy are kept per head (Korthikanti's 5as/h term: 2 + 1 + 2 bytes at 16 bits)."""
    if arch.attention_dropout <= 0:
        return 0.0
    return arch.heads * width * width * (2 * elem + MASK_BYTES)


def lm_loss_path() -> tuple[str, int | None]:
    """How the LM loss is computed by the code installed: ('chunked', logits per chunk) when CausalLM projects
    hidden states onto the vocabulary a chunk at a time (task_models.lm_loss_sum), else ('full', None)."""
    from tunelab.models import task_models

    chunk = getattr(task_models, "LOSS_CHUNK_LOGITS", None)
    return ("chunked", int(chunk)) if chunk else ("full", None)


def logits_bytes(rows: int, width: int, targets: int, arch: Architecture, counts: ParameterCounts, precision: str,
                 training: bool) -> float:
    """Bytes the LM head and loss hold at their peak.

    full path (backbone logits, then F.cross_entropy(logits[:, :-1].reshape(...).float())): the logits
    (kept by the task output until the next step), the log-softmax that cross-entropy saves, and in backward
    its incoming gradient and the one it produces: one copy at the run's element size plus three fp32 ones.
    Evaluation: logits, their shifted copy, the fp32 log-softmax.

    chunked path (task_models.lm_loss_sum): only the positions with a target, LOSS_CHUNK_LOGITS logits at a
    time; each chunk's logits, fp32 copy, log-softmax and two gradients; the stored gradient of the target
    hidden rows; and, when the head trains, a gradient accumulator plus one chunk's gradient of its weight.
    """
    if not counts.lm_head or rows == 0:  # classification: a few logits per row
        return 0.0
    elem = _elem_bytes(precision)
    upcast = 4 if elem != 4 else 0  # .float() is a copy only under autocast
    path, chunk = lm_loss_path()
    if path == "full":
        positions = rows * width
        if training:
            return positions * arch.vocab * (elem + 3 * 4)
        return positions * arch.vocab * (2 * elem + upcast + 4)
    chunk_rows = max(1, (chunk or 1) // arch.vocab)
    chunk_logits = min(targets, chunk_rows) * arch.vocab
    if not training:
        return chunk_logits * (elem + upcast + 4)
    head_grads = 2 * counts.lm_head_trainable * GRAD_BYTES_PER_PARAM
    return chunk_logits * (elem + upcast + 3 * 4) + targets * arch.hidden * (4 + elem) + head_grads


# ------------------------------------------------------------------------------------------ data shapes


@dataclass
class Batch:
    rows: int
    width: int  # padded sequence length, as collate pads (a multiple of 8)
    targets: int  # positions with a loss target (LM) or rows (classification)


@dataclass
class Shapes:
    train: list[Batch]
    eval: list[Batch]
    mean_tokens: float  # mean real tokens per training row
    target_fraction: float  # LM: share of real tokens that carry a target
    source: str


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


def _targets(feature: dict) -> int:
    labels = feature["labels"]
    if isinstance(labels, list):
        return sum(1 for t in labels[1:] if t != -100)
    return 1


def data_shapes(cfg: RunConfig, tokenizer=None, features=None) -> Shapes:
    """Micro-batch shapes of the run, from the tokenized data (`features`, a data.pipeline.Features, when the
    caller has them) and the loop's batch plan; max_length shapes when the data cannot be read."""
    try:
        return _shapes_from_data(cfg, tokenizer, features)
    except Exception as err:  # noqa: BLE001 -- a plan still helps without data; say why it fell back
        return _shapes_from_max_length(cfg, f"data.max_length (training data not read: {str(err).splitlines()[0]})")


def _shapes_from_max_length(cfg: RunConfig, source: str) -> Shapes:
    t, e, length = cfg.train, cfg.eval, cfg.data.max_length
    targets_per_row = length - 1 if cfg.task != "classification" else 1
    has_eval = bool(cfg.data.test or cfg.data.validation)
    return Shapes(
        train=[Batch(t.batch_size, _ceil8(length), t.batch_size * targets_per_row)],
        eval=[Batch(e.batch_size, _ceil8(length), e.batch_size * targets_per_row)] if has_eval else [],
        mean_tokens=float(length),
        target_fraction=1.0,
        source=source,
    )


def _shapes_from_data(cfg: RunConfig, tokenizer, features) -> Shapes:
    from tunelab.data.batching import batch_plan, eval_plan

    if features is None:
        from tunelab.data.examples import load_splits
        from tunelab.data.pipeline import tokenize_splits

        if tokenizer is None:
            from tunelab.models.loading import load_hf_config, load_tokenizer

            source, _ = load_hf_config(cfg.model)
            tokenizer = load_tokenizer(source, cfg.model)
        features = tokenize_splits(load_splits(cfg.data, cfg.task, cfg.train.seed), cfg, tokenizer)
    train = features.train
    lengths = [len(f["input_ids"]) for f in train]
    targets = [_targets(f) for f in train]
    t = cfg.train
    per_epoch = max(1, math.ceil(len(train) / t.batch_size))
    steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
    micro = steps * t.grad_accum
    batches: list[Batch] = []
    epoch = 0
    while len(batches) < micro:
        for idx in batch_plan(lengths, t.batch_size, t.seed, epoch, t.group_by_length):
            batches.append(Batch(len(idx), _ceil8(max(lengths[i] for i in idx)), sum(targets[i] for i in idx)))
            if len(batches) == micro:
                break
        epoch += 1
    evals: list[Batch] = []
    for split in (features.test, features.validation):
        if split:
            split_lengths = [len(f["input_ids"]) for f in split]
            first = eval_plan(split_lengths, cfg.eval.batch_size)[0]  # longest first: the largest batch
            width = _ceil8(max(split_lengths[i] for i in first))
            evals.append(Batch(len(first), width, sum(_targets(split[i]) for i in first)))
    real = sum(lengths)
    fraction = sum(targets) / max(real, 1) if cfg.task != "classification" else 0.0
    seen = "every micro-batch" if micro >= per_epoch else f"the first {micro} micro-batches"
    return Shapes(
        train=batches,
        eval=evals,
        mean_tokens=real / max(len(train), 1),
        target_fraction=fraction,
        source=f"tokenized training set ({len(train)} rows, mean {real / max(len(train), 1):.0f} tokens); "
        f"{seen} of the loop's batch plan",
    )


# ------------------------------------------------------------------------------------------ FLOPs


def flops_per_token(arch: Architecture, counts: ParameterCounts, seq_len: float, target_fraction: float,
                    training: bool) -> float:
    """Model FLOPs per real token (Kaplan et al. 2020, table 1; Chowdhery et al. 2022, "PaLM", appendix B).

    forward   2 x the matmul weights a token passes through, the LM head only for positions the loss
              projects (all of them on the full-logits path) + attention 4 L s d (QK^T and AV, s = mean
              context, d = the attention width)
    backward  the activation gradients again cost 2 x weights + 8 L s d; the weight gradients cost
              2 x the trainable matmul weights. Full fine-tuning: 6N + 12 L s d (PaLM's formula); a frozen
              base (LoRA and the like) about 4N + 12 L s d, as no base weight gradient is computed.
    eval      the forward alone: 2N + 4 L s d.

    Model FLOPs, not hardware FLOPs: gradient checkpointing's second forward is not counted (PaLM's MFU).
    Prompt tuning's virtual tokens go through the model too: each real token carries (s + n) / s of them.
    """
    path, _ = lm_loss_path()
    head = counts.lm_head * (target_fraction if path == "chunked" else 1.0)
    s = seq_len + counts.virtual_tokens
    overhead = s / seq_len if seq_len else 1.0
    attention = 4 * arch.layers * s * arch.heads * (arch.hidden // arch.heads)
    forward = (2 * counts.matmul_body + attention) * overhead + 2 * head
    if not training:
        return forward
    head_trainable = counts.lm_head_trainable * (target_fraction if path == "chunked" else 1.0)
    backward = (2 * counts.matmul_body + 2 * attention) * overhead + 2 * head
    backward += 2 * counts.trainable_matmul * overhead + 2 * head_trainable
    return forward + backward


# ------------------------------------------------------------------------------------------ the estimate


def _device_type(device) -> str:
    if device is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


def _train_activation_bytes(batch: Batch, arch: Architecture, counts: ParameterCounts, precision: str,
                            checkpointing: bool, packed: bool) -> float:
    elem = _elem_bytes(precision)
    width = batch.width + counts.virtual_tokens
    tokens = batch.rows * width
    per_layer_token = layer_activation_elements(arch, kv_repeated=not packed) * elem
    per_layer_token += dropout_bytes_per_token(arch, elem)
    per_layer_token += counts.method_activation_elements * elem + counts.method_activation_masks * MASK_BYTES
    per_layer_row = attention_score_bytes_per_row(arch, width, elem)
    per_layer_row += 0 if packed else width * width * 4  # SDPA keeps a float copy of the padding mask per layer
    per_layer_row += 2 * counts.prefix_tokens * arch.hidden * elem  # prefix tuning's keys and values
    one_layer = tokens * per_layer_token + batch.rows * per_layer_row
    if checkpointing:
        # Each block keeps only its input; backward recomputes one block at a time.
        layers = arch.layers * tokens * arch.hidden * elem + one_layer
    else:
        layers = arch.layers * one_layer
    embeddings = tokens * arch.hidden * (elem + (elem + MASK_BYTES if arch.hidden_dropout > 0 else 0))
    autocast = 2 * counts.linear_weights if elem == 2 else 0  # 16-bit weight copies saved for backward
    return layers + embeddings + autocast


def allocator_slack_bytes(batch: Batch, arch: Architecture, counts: ParameterCounts, precision: str,
                          activation_bytes: float, device: str, training: bool = True) -> float:
    """Freed memory the process keeps on CPU (see CPU_HEAP_SLACK_*); 0 on CUDA, whose peak counts live tensors.

    Inference passes (evaluation) reuse their own holes. A gradient-checkpointed forward does not: measured on
    SmolLM2 + LoRA (8 x 256 tokens), checkpointing cut the live tensors from ~5.5 GB to ~1.4 GB but left the
    same ~2.7 GB of slack, so the technique's temporaries count for every layer either way."""
    if device != "cpu":
        return 0.0
    if not training:
        return CPU_HEAP_SLACK_OF_ACTIVATIONS * activation_bytes
    tokens = batch.rows * (batch.width + counts.virtual_tokens)
    transients = arch.layers * tokens * counts.method_transient_elements * _elem_bytes(precision)
    return CPU_HEAP_SLACK_OF_ACTIVATIONS * activation_bytes + CPU_HEAP_SLACK_OF_TRANSIENTS * transients


def _eval_activation_bytes(batch: Batch, arch: Architecture, counts: ParameterCounts, precision: str) -> float:
    """Inference mode frees each block's tensors as it goes: a block's widest moment (MLP intermediates), plus
    the hidden states of every layer when the chunked LM loss asks the backbone for them."""
    elem = _elem_bytes(precision)
    width = batch.width + counts.virtual_tokens
    tokens = batch.rows * width
    block = tokens * (4 * arch.hidden + 3 * arch.intermediate) * elem + batch.rows * width * width * 4
    kept = 0
    if counts.lm_head and lm_loss_path()[0] == "chunked":
        kept = (arch.layers + 1) * tokens * arch.hidden * elem
    return block + kept


def _resolve_precision(cfg: RunConfig, dev: str) -> tuple[str, str | None]:
    import torch

    from tunelab.train.hardware import resolve_precision

    if dev == "cuda" and not torch.cuda.is_available() and cfg.train.precision == "auto":
        return "bf16", "precision: auto on a GPU this machine does not have; assumed bf16 (Ampere or newer)"
    return resolve_precision(cfg.train.precision), None


def _total(split: dict) -> dict:
    split = {k: int(v) for k, v in split.items()}
    return {**split, "total": sum(split.values())}


def estimate(cfg: RunConfig, *, device=None, precision: str | None = None, tokenizer=None, features=None,
             read_data: bool = True, num_labels: int = 2) -> dict:
    """The preflight estimate of one run (one process), as a JSON-ready dict.

    device: "cpu"/"cuda" (or a torch.device); default where the run would go. precision: the resolved run
    precision ("fp32", "bf16", "fp16"); default train.precision resolved for that device. tokenizer, features:
    reuse a loaded tokenizer or the run's tokenized data.pipeline.Features (the loop has both) instead of
    tokenizing again. read_data: False skips the data and assumes max_length rows. num_labels: the
    classification head's width (a few weights; 2 is fine for a plan).

    Keys:
      memory            bytes at the training step's peak: weights, gradients, optimizer, activations, logits,
                        allocator, runtime, and total (their sum)
      eval_memory       the same for the largest evaluation batch (no gradients), or None without eval data
      peak_memory_bytes the larger total, in the units of train.peak_memory_bytes (RSS on CPU; on CUDA
                        allocated tensor bytes, so without the CUDA context)
      peak_phase        "train" or "eval"
      flops_per_token   {"train", "eval"}: model FLOPs per real token (see flops_per_token)
      params, shapes, notes
    """
    from tunelab.models.loading import load_hf_config

    dev = _device_type(device)
    notes: list[str] = []
    if precision is None:
        precision, note = _resolve_precision(cfg, dev)
        notes += [note] if note else []
    _, hf_config = load_hf_config(cfg.model)
    counts, arch = count_parameters_for(cfg, hf_config, num_labels)
    notes += counts.notes
    if read_data:
        shapes = data_shapes(cfg, tokenizer, features)
    else:
        shapes = _shapes_from_max_length(cfg, "data.max_length (data not read)")

    weight_bytes = (counts.total - counts.quantized) * 4
    if counts.quantized:
        double = getattr(cfg.method, "double_quant", True)
        weight_bytes += counts.quantized * NF4_BYTES[double]
        notes.append(f"qlora: {counts.quantized:,} linear weights at {NF4_BYTES[double]:.3f} bytes each; "
                     "embeddings, norms and the LM head stay fp32")
    states = {
        "weights": weight_bytes,
        "gradients": counts.trainable * GRAD_BYTES_PER_PARAM,
        # from the first optimizer step on
        "optimizer": counts.trainable * (ADAM_8BIT_BYTES_PER_PARAM if cfg.train.optimizer == "adamw_8bit"
                                         else ADAM_BYTES_PER_PARAM),
    }
    runtime = CUDA_CONTEXT_BYTES if dev == "cuda" else CPU_RUNTIME_BYTES
    ckpt, packed = cfg.model.gradient_checkpointing, bool(getattr(cfg.data, "packing", False))

    def train_step(batch: Batch) -> dict:
        act = _train_activation_bytes(batch, arch, counts, precision, ckpt, packed)
        return _total({
            **states,
            "activations": act,
            "logits": logits_bytes(batch.rows, batch.width + counts.virtual_tokens, batch.targets, arch, counts,
                                   precision, training=True),
            "allocator": allocator_slack_bytes(batch, arch, counts, precision, act, dev),
            "runtime": runtime,
        })

    def eval_pass(batch: Batch) -> dict:
        act = _eval_activation_bytes(batch, arch, counts, precision)
        return _total({
            "weights": weight_bytes,
            "optimizer": states["optimizer"],  # periodic validation runs with the optimizer state alive
            "activations": act,
            "logits": logits_bytes(batch.rows, batch.width + counts.virtual_tokens, batch.targets, arch, counts,
                                   precision, training=False),
            "allocator": allocator_slack_bytes(batch, arch, counts, precision, act, dev, training=False),
            "runtime": runtime,
        })

    train_batch = max(shapes.train, key=lambda b: train_step(b)["total"])
    memory = train_step(train_batch)
    eval_batch = max(shapes.eval, key=lambda b: eval_pass(b)["total"]) if shapes.eval else None
    eval_memory = eval_pass(eval_batch) if eval_batch else None
    peak_phase = "eval" if eval_memory and eval_memory["total"] > memory["total"] else "train"
    peak = (eval_memory if peak_phase == "eval" else memory)["total"]

    path, chunk = lm_loss_path()
    notes.append(f"sequence shapes: {shapes.source}")
    notes.append(f"largest training micro-batch: {train_batch.rows} rows x {train_batch.width} tokens (padded)")
    if counts.lm_head:
        how = f"chunked, {chunk:,} logits at a time" if path == "chunked" else "full logits"
        notes.append(f"LM loss: {how} over a {arch.vocab:,}-token vocabulary")
    if ckpt:
        notes.append("gradient checkpointing: each block keeps its input; one block is recomputed at a time")
    if precision != "fp32":
        notes.append(f"{precision} autocast: activations at 2 bytes, plus a 16-bit copy of each linear weight")
    if dev == "cuda":
        notes.append(f"runtime = the CUDA context ({CUDA_CONTEXT_BYTES / GB:.1f} GB); torch's allocated-memory peak "
                     "does not see it, so peak_memory_bytes leaves it out")
    else:
        notes.append("CPU: the peak is process RSS (ru_maxrss), allocator slack included; it grows a little "
                     "over long runs with varying batch shapes")
    return {
        "model": cfg.model.name,
        "task": cfg.task,
        "method": cfg.method.name,
        "device": dev,
        "precision": precision,
        "params": {"total": counts.total, "trainable": counts.trainable, "quantized": counts.quantized,
                   "source": counts.source},
        "shapes": {
            "micro_batch": train_batch.rows,
            "seq_len": train_batch.width,
            "eval_batch": eval_batch.rows if eval_batch else None,
            "eval_seq_len": eval_batch.width if eval_batch else None,
            "mean_tokens": round(shapes.mean_tokens, 1), "source": shapes.source,
        },
        "memory": memory,
        "eval_memory": eval_memory,
        "peak_memory_bytes": int(peak - (runtime if dev == "cuda" else 0)),
        "peak_phase": peak_phase,
        "flops_per_token": {
            "train": flops_per_token(arch, counts, shapes.mean_tokens, shapes.target_fraction, training=True),
            "eval": flops_per_token(arch, counts, shapes.mean_tokens, shapes.target_fraction, training=False),
        },
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ display


def format_plan(est: dict) -> str:
    """A plain-text table of the estimate for the terminal."""
    mem, ev = est["memory"], est.get("eval_memory") or {}
    rows = [("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
            ("activations", "activations"), ("logits + loss", "logits"), ("allocator slack (CPU)", "allocator"),
            ("runtime", "runtime")]
    lines = [
        f"plan  {est['model']} ({est['task']}), method {est['method']}, {est['device']}, {est['precision']}",
        f"      {est['params']['trainable']:,} of {est['params']['total']:,} parameters trainable "
        f"({100 * est['params']['trainable'] / max(est['params']['total'], 1):.2f}%)",
        "",
        f"  {'memory':<26}{'train step':>12}{'eval pass':>12}",
    ]
    for label, key in rows:
        eval_value = f"{ev[key] / GB:>9.2f} GB" if key in ev else f"{'':>12}"
        lines.append(f"  {label:<26}{mem[key] / GB:>9.2f} GB{eval_value}")
    lines.append(f"  {'total':<26}{mem['total'] / GB:>9.2f} GB" + (f"{ev['total'] / GB:>9.2f} GB" if ev else ""))
    lines.append("")
    lines.append(f"  estimated peak ({est['peak_phase']}): {est['peak_memory_bytes'] / GB:.2f} GB")
    f = est["flops_per_token"]
    lines.append(f"  FLOPs per token: train {f['train']:.3g}, eval {f['eval']:.3g}")
    lines.append("")
    lines += [f"  - {note}" for note in est["notes"]]
    return "\n".join(lines)
