"""The one reader of /proc/cpuinfo: what the first processor says about itself (empty off Linux)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache
def cpu_fields() -> dict[str, str]:
    """The first processor's `key: value` fields. Every core of a machine reports the same model and flags,
    so the first block is enough; an unreadable file (macOS, Windows, a sandbox) gives {}."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The ISA extensions the CPU advertises (avx2, avx512f, avx512_bf16, amx_bf16, ...)."""
    return frozenset(cpu_fields().get("flags", "").split())


def cpu_model() -> str | None:
    """The marketing name, e.g. 'AMD EPYC 9654 96-Core Processor'; None where /proc/cpuinfo has none."""
    return cpu_fields().get("model name") or None
