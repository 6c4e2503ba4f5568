"""Load a finished run and use it: evaluate on a file, predict labels, generate text."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file

from tunelab.config import RunConfig, load_config
from tunelab.data.examples import load_examples
from tunelab.data.templates import choose_template, render_prompt
from tunelab.data.tokenize import tokenize_causal_lm, tokenize_classification, tokenize_instruction
from tunelab.errors import DataError, TunelabError
from tunelab.evaluate.runner import evaluate_classification, evaluate_lm, generate, predict_classes
from tunelab.methods import get_method
from tunelab.models.loading import load_task_model, load_tokenizer
from tunelab.runtime.hardware import precision_for_run, usable_cores
from tunelab.runtime.run_dir import RunDir


def load_run_config(run: RunDir, trust_remote_code: bool = False) -> RunConfig:
    """A run directory's config, with model.trust_remote_code from the command line, never from the file.

    A run directory is data that may come from anywhere (a download, a colleague, a registry): letting its
    config.yaml switch on remote code would run whatever Python the model repository it names ships. Only
    the person at the command line (`--trust-remote-code`) can turn it on.
    """
    cfg = load_config(run.config_path)
    cfg.model.trust_remote_code = trust_remote_code
    return cfg


def recorded_precision(run: RunDir, cfg: RunConfig) -> tuple[str, str | None]:
    """The precision the run trained in (its manifest), to use again here; and a note when this host can't."""
    manifest = run.manifest() if run.manifest_path.is_file() else {}
    return precision_for_run(manifest.get("precision"), cfg.train.precision)


class TrainedModel:
    """A finished run, loaded. base_backbone: the pretrained backbone to build on instead of loading it (it
    must be the run's own base model, loaded with the technique's pretrained_kwargs; the technique wraps it
    in place, so give each TrainedModel its own module tree, which may share weight tensors with others).

    It computes in the precision the run trained in; `precision_note` says why not when this host can't.
    trust_remote_code: what the command line said (see load_run_config)."""

    def __init__(self, run_dir: str | Path, base_backbone: nn.Module | None = None, trust_remote_code: bool = False):
        run = RunDir(run_dir)
        if not run.is_run():
            raise TunelabError(f"{run_dir}: not a run directory (no config.yaml)")
        if not run.has_model():
            raise TunelabError(f"{run_dir}: has no trained model (run status: {run.status()})")
        torch.set_num_threads(usable_cores())
        self.run, self.source = run, run.path
        self.cfg = load_run_config(run, trust_remote_code)
        self.labels = run.labels()
        self.precision, self.precision_note = recorded_precision(run, self.cfg)
        method = get_method(self.cfg.method.name)
        model, _, _ = load_task_model(
            self.cfg.model, self.cfg.task, num_labels=len(self.labels),
            pretrained_kwargs=method.pretrained_kwargs(self.cfg.method, self.precision), backbone=base_backbone,
        )
        files = run.model_files
        model.backbone = method.load(model.backbone, files.backbone)
        if self.labels:
            model.head.load_state_dict(load_file(files.head))
        self.model = model.eval()
        self.tokenizer = load_tokenizer(files.tokenizer, self.cfg.model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.template = choose_template(self.cfg.data.template, self.tokenizer) if self.cfg.task == "instruction" else None

    @classmethod
    def assemble(cls, cfg, labels: list[str], model: nn.Module, tokenizer, source: Path) -> TrainedModel:
        """A model built elsewhere (an export folder: export/loading.py) with the same evaluate, predict and
        generate as a run's; `run` is None, `source` says where it came from."""
        self = cls.__new__(cls)
        self.run, self.source, self.cfg, self.labels = None, Path(source), cfg, labels
        self.precision = "fp32"
        self.tokenizer = tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.template = choose_template(cfg.data.template, tokenizer) if cfg.task == "instruction" else None
        return self

    @property
    def task(self) -> str:
        return self.cfg.task

    def evaluate_file(self, path: str) -> dict:
        examples = load_examples(path, self.task, self.cfg.data.columns)
        e, max_len, pad = self.cfg.eval, self.cfg.data.max_length, self.tokenizer.pad_token_id
        if self.task == "classification":
            known = set(self.labels)
            for ex in examples:
                if ex["label"] not in known:
                    raise DataError(
                        f"{ex['where']}: label '{ex['label']}' is not one this model was trained on "
                        f"({', '.join(self.labels)})"
                    )
            feats = tokenize_classification(examples, self.tokenizer, max_len, self.labels, self.cfg.data.truncation)
            return evaluate_classification(self.model, feats, self.labels, e.batch_size, pad, self.precision, self.device)
        if self.task == "causal_lm":
            feats = tokenize_causal_lm(examples, self.tokenizer, max_len)
        else:
            feats, _ = tokenize_instruction(examples, self.tokenizer, max_len, self.template)
        return evaluate_lm(self.model, feats, e.batch_size, pad, self.precision, self.device)

    def predict(self, texts: list[str]) -> list[dict]:
        if self.task != "classification":
            raise TunelabError(f"predict needs a classification run; this run's task is '{self.task}' (use generate)")
        enc = tokenize_classification([{"text": t, "label": self.labels[0]} for t in texts], self.tokenizer,
                                      self.cfg.data.max_length, self.labels, self.cfg.data.truncation)
        preds, probs = predict_classes(self.model, enc, self.cfg.eval.batch_size, self.tokenizer.pad_token_id,
                                       self.precision, self.device)
        return [
            {"text": t, "label": self.labels[p], "score": float(probs[i, p]),
             "scores": {name: float(probs[i, j]) for j, name in enumerate(self.labels)}}
            for i, (t, p) in enumerate(zip(texts, preds))
        ]

    def generate(self, prompts: list[str], max_new_tokens: int | None = None,
                 repetition_penalty: float | None = None) -> list[dict]:
        if self.task == "classification":
            raise TunelabError("generate needs a causal_lm or instruction run; this is a classification run (use predict)")
        if self.task == "instruction":
            rendered = [render_prompt({"instruction": p, "input": ""}, self.tokenizer, self.template) for p in prompts]
        else:
            rendered = prompts
        out = generate(self.model, self.tokenizer, rendered, max_new_tokens or self.cfg.eval.max_new_tokens,
                       self.device, self.precision, add_special_tokens=self.template != "chat",
                       repetition_penalty=repetition_penalty or self.cfg.eval.repetition_penalty)
        for sample, prompt in zip(out, prompts):
            sample["prompt"] = prompt
        return out
