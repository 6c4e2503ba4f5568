"""The notes printed under vs_hf_trainer.py's tables: what each setup is and how to read an ablation row.

Kept apart so the benchmark script stays readable; the text is part of every results file it writes.
"""

SETUP_NOTES = [
    "- **HF tutorial recipe**: `Auto*` model + `get_peft_model(LoraConfig(...))` + `Trainer`; the tokenizer pads every "
    "example to max_length (`padding=\"max_length\"`), `default_data_collator`, random batches, fp32, the model's own "
    "dropout. No evaluation or checkpoint during training (`eval_strategy=\"no\"`, `save_strategy=\"no\"`) so that "
    "train time is training only, as for tunelab.",
    "- **best HF Trainer setup**: the same, plus `DataCollatorWithPadding(pad_to_multiple_of=8)` "
    "(`DataCollatorForSeq2Seq` for the LM, which also pads labels), `train_sampling_strategy=\"group_by_length\"` "
    "(transformers 5's name for `group_by_length=True`), every dropout of the model set to 0 through its config, "
    "and `bf16=True, use_cpu=True` only where the CPU has native bf16.",
    "- **best HF Trainer setup + tunelab's heap setting**: the same Trainer run, started with `MALLOC_MMAP_MAX_=0 "
    "MALLOC_TRIM_THRESHOLD_=2147483647`, what tunelab's default `train.cpu_heap: keep` sets through mallopt on "
    "Linux/glibc: freed memory stays in the process instead of being faulted in again each step. Not a Trainer "
    "setting; the row shows how much of the difference that allocator setting is.",
    "- **tunelab**: `run_training` with dynamic padding to a multiple of 8, length grouping, `model.dropout: 0`, "
    "`precision: auto`, `train.cpu_heap: keep` (its defaults), no packing (see the ablation for packing). The "
    "untuned-model evaluation tunelab runs before instruction training is skipped here: the Trainer runs none, and "
    "it would count in the peak memory.",
    "- Real tokens/s = attention-mask sum of all training batches / train wall (Trainer: `include_num_input_tokens_seen"
    "=\"non_padding\"` and `train_runtime`). Peak memory = process peak RSS on CPU (allocated tensors on CUDA), read "
    "right after training in a process that ran only that setup.",
]


ABLATION_NOTES = [
    "- Each row changes one thing from the baseline (tunelab's tuned config, the `tunelab` row of the comparison) and "
    "runs in its own process; `vs baseline` is its real tokens/s over the baseline's.",
    "- `pad-to-max` has no tunelab knob: the row replaces the loop's `collate` with one that pads every training batch "
    "to max_length (what the tutorial recipe's tokenizer does). Evaluation keeps its own padding.",
    "- Accuracy or perplexity moves with dropout and precision only through training noise at this budget; the speed "
    "columns are the point of the table.",
]
