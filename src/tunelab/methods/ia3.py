"""IA3 (Liu et al. 2022), through PEFT: learned vectors rescale keys, values and the FFN input,

    k' = l_k * k,   v' = l_v * v,   ffn' = W_out (l_ff * act(W_in x)),

initialised to 1, so step 0 is the base model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tunelab.methods.base import ActivationCost, MethodSettings
from tunelab.methods.peft_base import PeftMethod, task_type
from tunelab.methods.bitsandbytes_support import import_peft

if TYPE_CHECKING:
    from torch import nn


class Ia3Method(MethodSettings):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(
        None, description="Modules whose activations are rescaled; null = PEFT's default for the architecture (k, v, FFN)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are FFN layers (scaled on their input); null = PEFT's default."
    )


class Ia3(PeftMethod):
    name = "ia3"
    config_class = Ia3Method
    # IA3's vectors start at 1 and scale activations multiplicatively: the paper trains them at 3e-3.
    default_lr = 3e-3

    def peft_config(self, backbone: nn.Module, cfg, task: str):
        import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
        from peft import IA3Config

        return IA3Config(
            target_modules=cfg.target_modules,
            feedforward_modules=cfg.feedforward_modules,
            task_type=task_type(task),
        )

    def activation_cost(self, module: nn.Module, cfg) -> ActivationCost | None:
        """A PEFT IA3 layer: the scaled tensor is a new one, the FFN input (feedforward modules) or the K/V
        output; for K/V the unscaled output is freed once scaled."""
        if not (hasattr(module, "ia3_l") and hasattr(module, "base_layer") and len(module.ia3_l)):
            return None
        base = module.base_layer
        if getattr(module, "is_feedforward", False):
            return ActivationCost(kept=base.in_features)
        return ActivationCost(kept=base.out_features, transient=base.out_features)
