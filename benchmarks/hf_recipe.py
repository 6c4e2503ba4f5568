"""The Hugging Face Trainer + PEFT side of benchmarks/vs_hf_trainer.py: the tutorial recipe and the best
Trainer setup we could build, each trained and evaluated in the calling process."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def run_hf(w, args: argparse.Namespace, best: bool, work: str) -> dict:
    """The Trainer + PEFT recipe, as the tutorials write it (best=False) or as fast as it honestly goes."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorForSeq2Seq,
        DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator, set_seed,
    )

    from tunelab.config import DataConfig
    from tunelab.data.examples import load_splits
    from tunelab.data.templates import choose_template
    from tunelab.data.tokenize import tokenize_instruction
    from tunelab.evaluate.metrics import classification_metrics
    from tunelab.models.loading import DROPOUT_KEYS, quiet_transformers
    from tunelab.models.registry import resolve_model
    from tunelab.runtime.hardware import peak_memory_bytes, resolve_precision, usable_cores

    torch.set_num_threads(usable_cores())  # as tunelab does: os.cpu_count() overcounts in a container
    quiet_transformers()
    notes: list[str] = []
    # The same seeded subsets tunelab trains and evaluates on.
    data_cfg = DataConfig(train=str(ROOT / w.train), test=str(ROOT / w.test), max_length=w.max_length,
                          max_train_samples=args.train_samples, max_eval_samples=args.eval_samples)
    splits = load_splits(data_cfg, w.task, args.seed)
    source = resolve_model(w.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    precision = resolve_precision("auto") if best else "fp32"
    hf_config = AutoConfig.from_pretrained(source)
    dropout = {k: 0.0 for k in DROPOUT_KEYS if hasattr(hf_config, k)} if best else {}
    padding = False if best else "max_length"
    set_seed(args.seed)  # before the model: the classifier head and LoRA's A matrices are initialised randomly

    if w.task == "classification":
        index = {name: i for i, name in enumerate(splits.labels)}

        def encode(examples: list[dict]) -> list[dict]:
            enc = tokenizer([ex["text"] for ex in examples], truncation=True, max_length=w.max_length, padding=padding)
            return [{**{k: v[i] for k, v in enc.items()}, "labels": index[ex["label"]]}
                    for i, ex in enumerate(examples)]

        train_ds, test_ds = encode(splits.train), encode(splits.test)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=len(splits.labels), dtype=torch.float32, **dropout
        )
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8) if best else default_data_collator
        task_type = TaskType.SEQ_CLS
        notes.append("HF head: BertForSequenceClassification reads the pooler (CLS through dense+tanh); tunelab "
                     "mean-pools, which is how MiniLM was trained (see FINDINGS: the pooler output barely varies)")
    else:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        # tunelab's own prompt rendering and loss mask, so both sides learn exactly the same tokens. (The HF causal
        # LM tutorial's DataCollatorForLanguageModeling would train the prompt too, and mask SmolLM2's EOS, which
        # shares the pad id.)
        template = choose_template("auto", tokenizer)

        def encode(examples: list[dict]) -> list[dict]:
            feats, _ = tokenize_instruction(examples, tokenizer, w.max_length, template)
            out = []
            for f in feats:
                n, gap = len(f["input_ids"]), w.max_length - len(f["input_ids"])
                row = {"input_ids": f["input_ids"], "attention_mask": [1] * n, "labels": f["labels"]}
                if not best:  # padding="max_length", as the tutorial tokenizes
                    row = {"input_ids": row["input_ids"] + [tokenizer.pad_token_id] * gap,
                           "attention_mask": row["attention_mask"] + [0] * gap, "labels": row["labels"] + [-100] * gap}
                out.append(row)
            return out

        train_ds, test_ds = encode(splits.train), encode(splits.test)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **dropout)
        collator = (DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100) if best
                    else default_data_collator)
        task_type = TaskType.CAUSAL_LM
        notes.append(f"prompts in the {template} template, loss on the response and EOS only (tunelab's tokenization)")

    targets = args.lora_targets if isinstance(args.lora_targets, str) else list(args.lora_targets)
    extra = {}
    if best and w.task == "classification":
        # The stock head reads BERT's pooler, which PEFT leaves frozen; on MiniLM its output barely varies, so
        # the tutorial recipe learns little. The best setup trains the pooler with the classifier.
        extra["modules_to_save"] = ["classifier", "pooler"]
        notes.append("hf-best trains BERT's pooler with the classifier (modules_to_save)")
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type=task_type, **extra)
    model = get_peft_model(model, lora)
    training_args = TrainingArguments(
        output_dir=work,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=w.eval_batch_size,
        learning_rate=w.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        lr_scheduler_type=w.scheduler,
        warmup_steps=w.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),  # what bf16 on CPU needs; on a CPU-only machine fp32 runs there anyway
        train_sampling_strategy="group_by_length" if best else "random",
        include_num_input_tokens_seen="non_padding",  # Trainer's own count: attention_mask sums of training batches
        eval_strategy="no",  # tunelab evaluates after training too: train time is training only
        save_strategy="no",  # no checkpoint inside the timed loop (tunelab saves after it)
        report_to="none",
        disable_tqdm=True,
        logging_steps=10,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, data_collator=collator,
                      processing_class=tokenizer)
    out = trainer.train()
    device = trainer.args.device
    peak = peak_memory_bytes(device)  # before evaluation, as tunelab reads its own
    tokens = int(trainer.state.num_input_tokens_seen)
    wall = float(out.metrics["train_runtime"])

    if w.task == "classification":
        pred = trainer.predict(test_ds)
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        metrics = classification_metrics(pred.label_ids.tolist(), logits.argmax(-1).tolist(), splits.labels)
    else:
        metrics = lm_eval(model, test_ds, w.eval_batch_size, collator, precision, device)
    return {
        "precision": precision, "steps": int(trainer.state.global_step), "real_tokens": tokens,
        "wall_s": round(wall, 2),
        "real_tokens_per_s": tokens / wall if wall else None, "peak_memory_bytes": peak,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "eval": headline(metrics), "notes": notes,
    }


def lm_eval(model, features: list[dict], batch_size: int, collator, precision: str, device) -> dict:
    """Token-weighted test loss, as tunelab's evaluate_lm computes it: sum of the next-token cross-entropy over
    every labelled position / their count. (Trainer.evaluate's eval_loss averages per-batch means instead, and
    Trainer.predict would hold the whole test set's logits.)"""
    import torch
    import torch.nn.functional as F

    from tunelab.evaluate.metrics import lm_metrics
    from tunelab.evaluate.runner import autocast

    model.eval()
    order = sorted(range(len(features)), key=lambda i: -sum(features[i]["attention_mask"]))
    loss_sum, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collator([features[i] for i in order[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(torch.device(device), precision):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            loss_sum += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                              ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return lm_metrics(loss_sum, count)


def headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "f1_macro", "loss", "perplexity") if k in metrics}
