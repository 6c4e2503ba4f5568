"""The run being exported: its model as `tunelab evaluate` loads it, and the held-out inputs parity reads."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.data.examples import load_examples
from tunelab.data.tokenize import tokenize_causal_lm, tokenize_classification, tokenize_instruction
from tunelab.errors import TunelabError
from tunelab.export.parity import GREEDY_PROMPTS, IGNORE_INDEX, MAX_INPUTS, ParityInputs
from tunelab.inference.trained import TrainedModel
from tunelab.runtime.run_dir import RunDir


def load_run(run_dir: str | Path) -> TrainedModel:
    run = RunDir(run_dir)
    if not run.is_run():
        raise TunelabError(f"{run_dir}: not a run directory (no config.yaml)")
    if run.status() not in ("completed", "unknown"):
        raise TunelabError(f"{run_dir}: the run is {run.status()}, not completed; export a finished run")
    trained = TrainedModel(run_dir)
    if trained.precision != "fp32":
        # Parity thresholds are fp32 ones; a bf16 run is still exported in fp32 and compared in fp32.
        trained.precision = "fp32"
    return trained


def held_out_file(trained: TrainedModel, prompts_file: str | None) -> str:
    data = trained.cfg.data
    path = prompts_file or data.test or data.validation
    if not path:
        raise TunelabError(f"{trained.run.path}: the run has no data.test or data.validation file to measure parity "
                           "on; pass held-out examples with --inputs FILE")
    if not Path(path).is_file():
        raise TunelabError(f"{path}: held-out file not found (data.test of {trained.run.path}); pass --inputs FILE")
    return str(path)


def parity_inputs(trained: TrainedModel, prompts_file: str | None = None) -> ParityInputs:
    """Up to 64 held-out examples, tokenized as the run evaluates them; the first in file order, so two
    exports of one run are measured on the same inputs."""
    path = held_out_file(trained, prompts_file)
    cfg, tok = trained.cfg, trained.tokenizer
    examples = load_examples(path, trained.task, cfg.data.columns)
    if not examples:
        raise TunelabError(f"{path}: no examples to measure parity on")
    max_len = cfg.data.max_length
    if trained.task == "classification":
        known = set(trained.labels)
        examples = [ex for ex in examples if ex["label"] in known]
        feats = tokenize_classification(examples, tok, max_len, trained.labels, cfg.data.truncation)
        return ParityInputs("classification", feats[:MAX_INPUTS], path, tok.pad_token_id, full_test=feats)
    if trained.task == "causal_lm":
        feats = tokenize_causal_lm(examples[:MAX_INPUTS], tok, max_len)
        prompts = [f["input_ids"][: max(1, len(f["input_ids"]) // 2)] for f in feats[:GREEDY_PROMPTS]]
    else:
        feats, _ = tokenize_instruction(examples[:MAX_INPUTS], tok, max_len, trained.template)
        prompts = [f["input_ids"][: next(i for i, x in enumerate(f["labels"]) if x != IGNORE_INDEX)]
                   for f in feats[:GREEDY_PROMPTS]]
    return ParityInputs(trained.task, feats, path, tok.pad_token_id, prompts=prompts)


def reference_logits(trained: TrainedModel):
    """The run's own model as a logits function (fp32, on the CPU or the run's device)."""
    model, device = trained.model.eval(), trained.device

    @torch.inference_mode()
    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids.to(device), attention_mask.to(device)).logits
        if out.dim() == 3:
            out = out[:, out.size(1) - input_ids.size(1):]  # prompt tuning's virtual tokens come first
        return out.float().cpu()

    return logits


def tokenizer_record(trained: TrainedModel) -> dict:
    tok = trained.tokenizer
    return {
        "chat_template": getattr(tok, "chat_template", None), "template": trained.template,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "pad_token": tok.pad_token,
    }


def source_record(trained: TrainedModel) -> dict:
    run = trained.run
    manifest = run.manifest() if run.manifest_path.is_file() else {}
    return {
        "run": str(run.path.resolve()), "task": trained.task, "method": trained.cfg.method.name,
        "base_model": trained.cfg.model.name, "git_commit": manifest.get("git_commit"),
        "run_status": manifest.get("status"), "config": trained.cfg.model_dump(mode="json"),
    }
