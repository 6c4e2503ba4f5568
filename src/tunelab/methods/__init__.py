"""One module per technique, all behind the `Method` interface (see base.py)."""

from __future__ import annotations

from tunelab.methods.adapters import BottleneckAdapter
from tunelab.methods.base import Method, count_parameters
from tunelab.methods.full import FullFineTuning
from tunelab.methods.peft_methods import Dora, Ia3, Lora, PrefixTuning, PromptTuning, Qlora

METHODS: dict[str, Method] = {
    m.name: m
    for m in (FullFineTuning(), Lora(), Dora(), Qlora(), Ia3(), PromptTuning(), PrefixTuning(), BottleneckAdapter())
}


def get_method(name: str) -> Method:
    return METHODS[name]  # names are validated by the config schema


__all__ = ["METHODS", "Method", "count_parameters", "get_method"]
