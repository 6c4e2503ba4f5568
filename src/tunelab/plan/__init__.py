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

from tunelab.plan.estimate import estimate, format_plan

__all__ = ["estimate", "format_plan"]
