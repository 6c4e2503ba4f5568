"""One module per technique, all behind the `Method` interface (see base.py), registered here, in one place.

Adding a technique: write its module (a `MethodSettings` config section and a `Method` beside it), add one
instance to TECHNIQUES below, and one row to the table in tests/test_methods.py. The run schema
(config.py), the planner (plan/) and the training loop pick it up from this registry.
"""

from __future__ import annotations

from tunelab.methods.adapters import BottleneckAdapter
from tunelab.methods.base import Method, MethodSettings, count_parameters
from tunelab.methods.full import FullFineTuning
from tunelab.methods.ia3 import Ia3
from tunelab.methods.lora import Dora, Lora, Qlora
from tunelab.methods.prompt import PrefixTuning, PromptTuning

# The order is the order users see them listed in (`method.name` choices, docs).
TECHNIQUES: tuple[Method, ...] = (
    FullFineTuning(), Lora(), Dora(), Qlora(), Ia3(), PromptTuning(), PrefixTuning(), BottleneckAdapter(),
)
METHODS: dict[str, Method] = {m.name: m for m in TECHNIQUES}


def get_method(name: str) -> Method:
    return METHODS[name]  # names are validated by the config schema


def method_configs() -> list[type[MethodSettings]]:
    """Every technique's config section, in registry order: the `method:` choices of the run schema."""
    return [m.config_class for m in TECHNIQUES]


def method_blocking_packing(backbone) -> Method | None:
    """The registered technique that `backbone` carries and that cannot run packed rows, if any."""
    return next((m for m in TECHNIQUES if m.packing_refusal and m.blocks_packing(backbone)), None)


__all__ = ["METHODS", "TECHNIQUES", "Method", "MethodSettings", "count_parameters", "get_method",
           "method_blocking_packing", "method_configs"]
