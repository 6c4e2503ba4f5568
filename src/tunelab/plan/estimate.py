"""The estimate itself: memory terms, FLOPs per token, and the terminal table (see the package docstring)."""

from __future__ import annotations

from tunelab.config import RunConfig
from tunelab.plan.architecture import Architecture, ParameterCounts, count_parameters_for
from tunelab.plan.shapes import Batch, data_shapes, shapes_from_max_length
from tunelab.results import FlopsPerToken, MemorySplit, ParameterSummary, Plan, ShapeSummary

GB = 1e9
GIB = 1024**3  # the table prints binary units, as every report and run summary does

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


def _elem_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# ------------------------------------------------------------------------------------------ model shape


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

    from tunelab.runtime.hardware import resolve_precision

    if dev == "cuda" and not torch.cuda.is_available() and cfg.train.precision == "auto":
        return "bf16", "precision: auto on a GPU this machine does not have; assumed bf16 (Ampere or newer)"
    return resolve_precision(cfg.train.precision), None


def estimate(cfg: RunConfig, *, device=None, precision: str | None = None, tokenizer=None, features=None,
             read_data: bool = True, num_labels: int = 2) -> Plan:
    """The preflight estimate of one run (one process); `.to_dict()` is what a run records in metrics.json.

    device: "cpu"/"cuda" (or a torch.device); default where the run would go. precision: the resolved run
    precision ("fp32", "bf16", "fp16"); default train.precision resolved for that device. tokenizer, features:
    reuse a loaded tokenizer or the run's tokenized data.pipeline.Features (the loop has both) instead of
    tokenizing again. read_data: False skips the data and assumes max_length rows. num_labels: the
    classification head's width (a few weights; 2 is fine for a plan).

    Fields (results.Plan):
      memory            bytes at the training step's peak: weights, gradients, optimizer, activations, logits,
                        allocator, runtime (and their total)
      eval_memory       the same for the largest evaluation batch (no gradients), or None without eval data
      peak_memory_bytes the larger total, in the units of train.peak_memory_bytes (RSS on CPU; on CUDA
                        allocated tensor bytes, so without the CUDA context)
      peak_phase        "train" or "eval"
      flops_per_token   train and eval: model FLOPs per real token (see flops_per_token)
      params, shapes, notes
    """
    from tunelab.methods import get_method
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
        shapes = shapes_from_max_length(cfg, "data.max_length (data not read)")

    weight_bytes = (counts.total - counts.quantized) * 4
    if counts.quantized:
        quantized_bytes = get_method(cfg.method.name).quantized_weight_bytes(cfg.method)
        weight_bytes += counts.quantized * quantized_bytes
        notes.append(f"{cfg.method.name}: {counts.quantized:,} linear weights at {quantized_bytes:.3f} bytes each; "
                     "embeddings, norms and the LM head stay fp32")
    states = {
        "weights": int(weight_bytes),
        "gradients": int(counts.trainable * GRAD_BYTES_PER_PARAM),
        # from the first optimizer step on
        "optimizer": int(counts.trainable * (ADAM_8BIT_BYTES_PER_PARAM if cfg.train.optimizer == "adamw_8bit"
                                             else ADAM_BYTES_PER_PARAM)),
    }
    runtime = CUDA_CONTEXT_BYTES if dev == "cuda" else CPU_RUNTIME_BYTES
    ckpt, packed = cfg.model.gradient_checkpointing, bool(getattr(cfg.data, "packing", False))

    def train_step(batch: Batch) -> MemorySplit:
        act = _train_activation_bytes(batch, arch, counts, precision, ckpt, packed)
        return MemorySplit(
            **states,
            activations=int(act),
            logits=int(logits_bytes(batch.rows, batch.width + counts.virtual_tokens, batch.targets, arch, counts,
                                    precision, training=True)),
            allocator=int(allocator_slack_bytes(batch, arch, counts, precision, act, dev)),
            runtime=runtime,
        )

    def eval_pass(batch: Batch) -> MemorySplit:
        act = _eval_activation_bytes(batch, arch, counts, precision)
        return MemorySplit(
            weights=states["weights"],
            optimizer=states["optimizer"],  # periodic validation runs with the optimizer state alive
            activations=int(act),
            logits=int(logits_bytes(batch.rows, batch.width + counts.virtual_tokens, batch.targets, arch, counts,
                                    precision, training=False)),
            allocator=int(allocator_slack_bytes(batch, arch, counts, precision, act, dev, training=False)),
            runtime=runtime,
        )

    train_batch = max(shapes.train, key=lambda b: train_step(b).total)
    memory = train_step(train_batch)
    eval_batch = max(shapes.eval, key=lambda b: eval_pass(b).total) if shapes.eval else None
    eval_memory = eval_pass(eval_batch) if eval_batch else None
    peak_phase = "eval" if eval_memory and eval_memory.total > memory.total else "train"
    peak = (eval_memory if peak_phase == "eval" else memory).total

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
        notes.append("CPU: the peak is the process's peak RSS (VmHWM), allocator slack included; it grows a little "
                     "over long runs with varying batch shapes")
    return Plan(
        model=cfg.model.name,
        task=cfg.task,
        method=cfg.method.name,
        device=dev,
        precision=precision,
        params=ParameterSummary(total=counts.total, trainable=counts.trainable, quantized=counts.quantized,
                                source=counts.source),
        shapes=ShapeSummary(
            micro_batch=train_batch.rows,
            seq_len=train_batch.width,
            eval_batch=eval_batch.rows if eval_batch else None,
            eval_seq_len=eval_batch.width if eval_batch else None,
            mean_tokens=round(shapes.mean_tokens, 1),
            source=shapes.source,
        ),
        memory=memory,
        eval_memory=eval_memory,
        peak_memory_bytes=int(peak - (runtime if dev == "cuda" else 0)),
        peak_phase=peak_phase,
        flops_per_token=FlopsPerToken(
            train=flops_per_token(arch, counts, shapes.mean_tokens, shapes.target_fraction, training=True),
            eval=flops_per_token(arch, counts, shapes.mean_tokens, shapes.target_fraction, training=False),
        ),
        notes=notes,
    )


# ------------------------------------------------------------------------------------------ display


def format_plan(plan: Plan) -> str:
    """A plain-text table of the estimate for the terminal, in GiB."""
    params = plan.params
    what = "process RSS" if plan.device == "cpu" else "allocated tensors"
    lines = [
        f"plan  {plan.model} ({plan.task}), method {plan.method}, {plan.device}, {plan.precision}",
        f"      {params.trainable:,} of {params.total:,} parameters trainable "
        f"({100 * params.trainable / max(params.total, 1):.2f}%)",
        "",
        f"  {'memory':<26}{'train step':>12}{'eval pass':>12}",
    ]
    for label, train_bytes, eval_bytes in plan.memory_rows():
        eval_value = f"{eval_bytes / GIB:>8.2f} GiB" if eval_bytes is not None else ""
        lines.append(f"  {label:<26}{train_bytes / GIB:>8.2f} GiB{eval_value}")
    lines.append("")
    lines.append(f"  estimated peak ({plan.peak_phase}, {what}): {plan.peak_memory_bytes / GIB:.2f} GiB")
    lines.append(f"  FLOPs per token: train {plan.flops_per_token.train:.3g}, eval {plan.flops_per_token.eval:.3g}")
    lines.append("")
    lines += [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)
