"""What the PEFT-backed techniques share: PEFT does the wrapping, saving (adapter weights only, as
safetensors) and loading; each technique only says which PEFT config to build (lora.py, ia3.py, prompt.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.methods.base import Method
from tunelab.methods.bitsandbytes_support import import_peft

if TYPE_CHECKING:
    from torch import nn


def task_type(task: str):
    import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
    from peft import TaskType

    # Classification pools the backbone's hidden states in our own head, so PEFT sees a feature extractor.
    return TaskType.FEATURE_EXTRACTION if task == "classification" else TaskType.CAUSAL_LM


def is_checkpointing(backbone: nn.Module) -> bool:
    flag = getattr(backbone, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(flag if flag is not None else getattr(backbone, "is_gradient_checkpointing", False))


def peft_type_of(backbone: nn.Module) -> str | None:
    """The PEFT technique a backbone carries ('LORA', 'PROMPT_TUNING', ...), None for a plain model."""
    kind = getattr(getattr(backbone, "active_peft_config", None), "peft_type", None)
    return getattr(kind, "value", kind)  # PeftType is a str enum; its value is the plain name


class PeftMethod(Method):
    """Shared apply/save/load: subclasses only say which PEFT config to build."""

    named_adapters_refusal = None  # PEFT keeps several named adapters on one base and switches between them

    def peft_config(self, backbone: nn.Module, cfg, task: str):
        raise NotImplementedError

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
        from peft import get_peft_model

        model = get_peft_model(backbone, self.peft_config(backbone, cfg, task))
        if is_checkpointing(backbone):
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        return model

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        # PEFT picks the adapter's own tensors out of a whole-model state_dict when one is given.
        backbone.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)

    def add_adapter(self, backbone: nn.Module, cfg, task: str, adapter_name: str) -> None:
        backbone.add_adapter(adapter_name, self.peft_config(backbone, cfg, task))

    def set_adapter(self, backbone: nn.Module, adapter_name: str) -> None:
        backbone.set_adapter(adapter_name)  # PEFT also turns requires_grad off on the other LoRA/IA3 adapters

    def save_adapter(self, backbone: nn.Module, out_dir: Path, adapter_name: str) -> None:
        # PEFT writes an adapter other than "default" into out_dir/<name>/, with its tensors' keys stripped of
        # the name; load() reads out_dir itself as the default adapter, so the files move up one level.
        backbone.save_pretrained(out_dir, safe_serialization=True, selected_adapters=[adapter_name])
        if adapter_name != "default":
            nested = Path(out_dir) / adapter_name
            for path in nested.iterdir():
                path.replace(Path(out_dir) / path.name)
            nested.rmdir()

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
        from peft import PeftModel

        return PeftModel.from_pretrained(base_backbone, out_dir)

    def merged(self, backbone: nn.Module, saved_dir: Path) -> nn.Module:
        """LoRA and DoRA add B A (DoRA: and rescale by the learned magnitude) into W; IA3 multiplies its vectors
        into the weights it scales. PEFT does the arithmetic, in fp64 (merge_in_fp64)."""
        return merge_in_fp64(backbone)


def merge_in_fp64(peft_model: nn.Module) -> nn.Module:
    """PEFT's merge_and_unload with every layer's merge computed in fp64, then rounded to fp32 once.

    Why: the merged weight W + s B A is then the fp32 number nearest the exact one, for every element (merged in
    fp32, B A and the sum are each rounded, and DoRA's column norms are summed in fp32 too). What is left between
    the merged model and the run's is the fp32 arithmetic of the two forward passes, which no choice of fp32
    weights removes (docs/10-deployment.md gives the measured sizes).
    Cost: one adapted layer at a time is upcast (its base weight and adapter) and cast back before the next, on
    the CPU (MPS has no fp64): the extra memory is at most the largest adapted matrix in fp64 twice over, the
    weight and its update (for a 7B Llama's 11008 x 4096 MLP projections: 720 MB), never a copy of the model;
    the time is one fp64 product per layer (SmolLM2-135M's 210 LoRA layers: 0.5 s on 2 CPU cores, where PEFT's
    fp32 merge took 1.1 s).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if not (isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer")):
            continue
        weight = module.get_base_layer().weight
        device, dtype = weight.device, torch.promote_types(weight.dtype, torch.float32)
        module.to(device="cpu", dtype=torch.float64)
        module.merge()
        module.to(device=device, dtype=dtype)
    return peft_model.unload()  # every layer merged already: unload only drops the wrappers
