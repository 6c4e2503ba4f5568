"""The two Hugging Face layouts: `merged` (a plain transformers folder) and `adapter` (PEFT's folder).

merged, language models: config.json, model.safetensors, generation_config.json and the tokenizer (with its
  chat template): `AutoModelForCausalLM.from_pretrained(DIR)` loads it, no tunelab needed.
merged, classifiers: the backbone as a transformers folder (`AutoModel.from_pretrained(DIR)`) plus
  classifier_head.safetensors (weight, bias of one linear layer) applied to the pooled hidden states; the
  pooling (mean of the real tokens, last real token or first token) is in export.json under `classifier`.
  tunelab's classifiers pool their own way (mean pooling for MiniLM), which no AutoModelFor... class does,
  so the head travels beside the backbone instead of pretending to be BertForSequenceClassification.
adapter: adapter_config.json + adapter_model.safetensors as PEFT writes them (PEFT, vLLM and LoRAX load this
  layout), the tokenizer, and classifier_head.safetensors for classifiers. It needs its base model, named in
  export.json (`base_model_path`) and in adapter_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.inference.trained import TrainedModel
from tunelab.methods import get_method

HEAD_FILE = "classifier_head.safetensors"


def refuse_unless(method_name: str, fmt: str) -> None:
    """One line when the run's technique has no such format, naming the one that serves it."""
    method = get_method(method_name)
    refusal = method.merge_refusal if fmt in ("merged", "onnx", "gguf") else method.adapter_refusal
    if refusal:
        what = "cannot be merged into the base weights" if fmt != "adapter" else "has no adapter folder"
        need = f" (--format {fmt} starts from the merged model)" if fmt in ("onnx", "gguf") else ""
        raise TunelabError(f"--format {fmt}: method '{method_name}' {what}{need}: {refusal}")


def classifier_record(trained: TrainedModel) -> dict | None:
    if trained.task != "classification":
        return None
    return {"pooling": trained.model.pooling, "head_file": HEAD_FILE, "hidden_size": trained.model.head.in_features,
            "num_labels": trained.model.head.out_features}


def _save_head(trained: TrainedModel, out: Path) -> None:
    from safetensors.torch import save_file

    if trained.task == "classification":
        head = trained.model.head
        save_file({"weight": head.weight.detach().float().cpu().contiguous(),
                   "bias": head.bias.detach().float().cpu().contiguous()}, out / HEAD_FILE)


def _save_tokenizer(trained: TrainedModel, out: Path) -> None:
    trained.tokenizer.save_pretrained(out)


def merged_backbone(trained: TrainedModel) -> nn.Module:
    """The run's backbone with its technique folded in, fp32, in eval mode. Consumes `trained` (PEFT's merge
    changes the weights in place): pass a copy loaded for this, never the reference model."""
    method = get_method(trained.cfg.method.name)
    backbone = method.merged(trained.model.backbone, trained.run.model_files.backbone)
    return backbone.to(torch.float32).eval()


def write_merged(trained: TrainedModel, out: Path) -> nn.Module:
    """Write the merged folder into `out`; returns the merged backbone."""
    backbone = merged_backbone(trained)
    tok = trained.tokenizer
    gen = getattr(backbone, "generation_config", None)
    if gen is not None:  # the run's EOS and pad, so a plain `generate` stops where tunelab's does
        gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    backbone.config.pad_token_id = tok.pad_token_id
    backbone.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(trained, out)
    _save_head(trained, out)
    return backbone


def write_adapter(trained: TrainedModel, out: Path) -> dict:
    """Copy the run's PEFT folder, pointed at the base it was trained on; returns what export.json records."""
    from tunelab.models.registry import resolve_model

    saved = trained.run.model_files.backbone
    for file in sorted(saved.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors"):
            shutil.copy2(file, out / file.name)
    config_file = out / "adapter_config.json"
    if not config_file.is_file():
        raise TunelabError(f"{saved}: no adapter_config.json; this run's adapter was not saved by PEFT")
    base_path = resolve_model(trained.cfg.model.name)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_path
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _save_tokenizer(trained, out)
    _save_head(trained, out)
    return {"base_model_path": base_path, "peft_type": config.get("peft_type")}


# ---------------------------------------------------------------------------- loading them back


def _attach_head(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.head.load_state_dict(load_file(path / HEAD_FILE))


def build_task_model(backbone: nn.Module, cfg, labels: list[str], classifier: dict | None, path: Path) -> nn.Module:
    from tunelab.models.task_models import CausalLM, SequenceClassifier

    if cfg.task != "classification":
        return CausalLM(backbone).eval()
    model = SequenceClassifier(backbone, classifier["hidden_size"], len(labels), classifier["pooling"], 0.0)
    _attach_head(model, path)
    return model.eval()


def load_merged_model(path: Path, cfg, labels: list[str], classifier: dict | None) -> nn.Module:
    """The merged folder as a task model, loaded the way a user without tunelab would load it."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if cfg.task == "classification" else AutoModelForCausalLM
    backbone = auto.from_pretrained(path, dtype=torch.float32).eval()
    return build_task_model(backbone, cfg, labels, classifier, path)


def load_adapter_model(path: Path, cfg, labels: list[str], classifier: dict | None,
                       base_backbone: nn.Module | None = None) -> nn.Module:
    """The base model (as the run loaded it: QLoRA's in 4 bits) with the exported adapter applied."""
    from tunelab.models.loading import load_task_model
    from tunelab.runtime.hardware import resolve_precision

    method = get_method(cfg.method.name)
    kwargs = method.pretrained_kwargs(cfg.method, resolve_precision(cfg.train.precision))
    model, _, _ = load_task_model(cfg.model, cfg.task, num_labels=max(len(labels), 2), pretrained_kwargs=kwargs,
                                  backbone=base_backbone)
    model.backbone = method.load(model.backbone, path)
    if cfg.task == "classification":
        _attach_head(model, path)
    return model.eval()


def logits_of(model: nn.Module):
    """A task model as a logits function, like parity's reference."""

    @torch.inference_mode()
    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids, attention_mask).logits
        if out.dim() == 3:
            out = out[:, out.size(1) - input_ids.size(1):]
        return out.float()

    return logits
