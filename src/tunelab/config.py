"""The typed schema of a run, loaded from YAML with dotted command-line overrides.

Every section forbids unknown keys, so a typo (`train.lrr`) stops the run before any work starts, with
one line naming the key and the keys that are valid there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.errors import ConfigError

Task = Literal["classification", "causal_lm", "instruction"]
# `duplicates>1%,leakage>0`: the syntax of data-check rules (data/quality.py parses them and knows the names).
RULES_PATTERN = r"^\s*[a-z_]+\s*>=?\s*[0-9.]+%?\s*(,\s*[a-z_]+\s*>=?\s*[0-9.]+%?\s*)*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(description="Bundled short name (see `tunelab models`), a local HF folder, or a hub id.")
    pooling: Literal["auto", "mean", "last", "cls"] = Field(
        "auto",
        description="Classification only: how token states become one vector. auto = mean for encoders, "
        "last (non-pad) token for decoders.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less activation memory, slower steps."
    )
    dropout: float | None = Field(
        None, ge=0, lt=1,
        description="Set every dropout of the backbone and head; null = the model's own. 0 is much faster on CPU: "
        "attention dropout forces SDPA off its fused kernel.",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel. auto = transformers' choice (PyTorch SDPA where the model supports it); "
        "flash_attention_2 needs a CUDA GPU and the flash-attn package (packed batches then run varlen); "
        "eager = the plain matmul-softmax path, for debugging.",
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a hub model. Off for safety.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")


class DataConfig(_Section):
    train: str = Field(description="Training file (.jsonl, .csv, .parquet) or 'hub:NAME' when online.")
    test: str | None = Field(None, description="Held-out file for the final evaluation.")
    validation: str | None = Field(None, description="File for periodic evaluation during training.")
    validation_split: float = Field(
        0.0, ge=0.0, lt=0.5, description="Fraction of train held out (stratified) when no validation file is given."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map tunelab field -> your column, e.g. {text: review, label: sentiment}.",
    )
    max_length: int = Field(256, ge=8, description="Tokens per example after truncation.")
    truncation: Literal["head", "head_tail"] = Field(
        "head",
        description="Classification: keep the first max_length tokens (head), or the first quarter and the last "
        "three quarters (head_tail; reviews often state the verdict at the end).",
    )
    max_train_samples: int | None = Field(None, ge=1, description="Random (seeded) subset of train; null = all.")
    max_eval_samples: int | None = Field(None, ge=1, description="Random (seeded) subset of test/validation.")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="Instruction prompt format: the model's chat template when it has one, else Alpaca."
    )
    packing: bool = Field(
        False,
        description="causal_lm/instruction: pack several examples into each max_length row, attention kept "
        "within each example. No padding to compute; the loss of every example is unchanged.",
    )
    checks: Literal["warn", "stop", "off"] = Field(
        "warn",
        description="Cheap data checks before the model loads (exact duplicates, train/test leakage, empty texts): "
        "warn = print what check_rules finds and train anyway; stop = refuse to train; off = skip them. "
        "`tunelab data check` runs the full set (near duplicates, token lengths).",
    )
    check_rules: str = Field(
        "leakage>0,duplicates>1%",
        pattern=RULES_PATTERN,
        description="When the checks speak up: comma-separated NAME>VALUE rules, a trailing % for a share of the "
        "rows (names as in `tunelab data check --fail-on`).",
    )


class FullMethod(_Section):
    name: Literal["full"] = "full"


class LoraMethod(_Section):
    name: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, description="Rank of the update B@A: higher = more capacity and memory.")
    alpha: float = Field(16, gt=0, description="Scale of the update is alpha/rank.")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the LoRA input. 0 (the default) lets the adapter reuse the input its layer already "
        "keeps for backward; >0 keeps a dropped copy per adapted layer: 1.22x slower and a 25% higher peak on "
        "SmolLM2 for the same perplexity (docs/09-optimization.md). Raise it when a long run overfits.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear for every linear layer but the output."
    )
    use_dora: bool = Field(False, description="DoRA: learn magnitude and direction apart; slower per step.")


class DoraMethod(LoraMethod):
    """LoRA with the weight split into magnitude and direction (Liu et al. 2024): `lora` with use_dora on."""

    name: Literal["dora"] = "dora"  # type: ignore[assignment]
    use_dora: Literal[True] = Field(True, description="Always on for dora.")


class QloraMethod(LoraMethod):
    """LoRA on a base whose linear layers are stored in 4 bits (Dettmers et al. 2023)."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too: ~0.4 bits/weight saved.")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for each matmul; auto = the run's precision."
    )


class Ia3Method(_Section):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(
        None, description="Modules whose activations are rescaled; null = PEFT's default for the architecture (k, v, FFN)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are FFN layers (scaled on their input); null = PEFT's default."
    )


class PromptMethod(_Section):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable embeddings prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="Start from random vectors or from init_text's embeddings.")
    init_text: str | None = Field(None, description="With init: text, e.g. 'Classify the sentiment of this review:'.")

    @model_validator(mode="after")
    def _text_needs_text(self) -> PromptMethod:
        if self.init == "text" and not self.init_text:
            raise ValueError("init 'text' needs init_text")
        return self


class PrefixMethod(_Section):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, description="Trainable key/value pairs prepended in every layer.")
    projection: bool = Field(False, description="Reparameterize the prefix through an MLP (Li & Liang 2021); more weights.")


class AdapterMethod(_Section):
    name: Literal["adapter"] = "adapter"
    config: Literal["pfeiffer", "houlsby", "parallel"] = Field(
        "pfeiffer",
        description="Where bottlenecks go: pfeiffer = after each FFN; houlsby = after attention and FFN; "
        "parallel = beside each FFN.",
    )
    reduction_factor: int = Field(16, ge=1, description="Bottleneck width = hidden size / reduction_factor.")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    scaling: float = Field(1.0, gt=0, description="Multiplier on the adapter's output (He et al. use 4 for parallel adapters).")
    compose_with: list[str] = Field(
        default_factory=list, description="Run directories of trained adapters, loaded frozen and composed with the new one."
    )
    composition: Literal["stack", "parallel", "average"] = Field(
        "stack",
        description="How the adapters combine: stack = one after another; parallel = side by side, outputs summed; "
        "average = outputs averaged.",
    )


MethodConfig = Annotated[
    Union[FullMethod, LoraMethod, DoraMethod, QloraMethod, Ia3Method, PromptMethod, PrefixMethod, AdapterMethod],
    Field(discriminator="name"),
]


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps; overrides epochs.")
    batch_size: int = Field(16, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; null = the method's default.")
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps spent warming up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto = bf16 autocast where the hardware runs it natively (AMX/AVX512-BF16 CPUs, bf16 GPUs), "
        "fp16 on older GPUs, else fp32.",
    )
    group_by_length: bool = Field(True, description="Batch similar lengths together: far less padding.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw",
        description="adamw = torch AdamW (its fused kernel on CUDA), 8 bytes of state per trainable weight; "
        "adamw_8bit = bitsandbytes' block-wise 8-bit AdamW, 2 bytes: for full fine-tuning where optimizer state "
        "dominates memory, at some cost in speed (dequantizing the state every step).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the backbone. Fuses elementwise work, but the first steps pay the compile "
        "(a minute on a 2-core CPU) and new sequence lengths can recompile: off unless measured to win "
        "(docs/09-optimization.md).",
    )
    cpu_heap: Literal["keep", "release"] = Field(
        "keep",
        description="CPU runs on Linux/glibc: keep = freed tensor memory stays in the process for the next step "
        "(no page faults re-filling it; 1.11x on IMDB here), but resident memory stays at its peak until the "
        "process ends; release = glibc's defaults. Ignored when MALLOC_* variables are set.",
    )
    seed: int = 42
    log_every: int = Field(10, ge=1, description="Optimizer steps between metric lines.")
    eval_every: int | None = Field(None, ge=1, description="Optimizer steps between validation passes.")
    save_every: int | None = Field(None, ge=1, description="Optimizer steps between checkpoints (for --resume).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")


class EvalConfig(_Section):
    batch_size: int = Field(64, ge=1)
    untuned: bool = Field(
        True,
        description="LM/instruction runs: evaluate the untuned model first, to show what training bought "
        "(costs one test pass and the samples; turn off in sweeps and benchmarks).",
    )
    num_samples: int = Field(3, ge=0, description="Instruction/LM runs: generations shown in the report.")
    max_new_tokens: int = Field(96, ge=1)
    repetition_penalty: float = Field(
        1.0, ge=1.0,
        description="Greedy samples: >1 discourages repeated tokens, but also the end-of-turn token itself.",
    )


class TrackConfig(_Section):
    enabled: bool = Field(
        True,
        description="Log the run to MLflow: params, step and final metrics, artifacts, data files with their sha256. "
        "A store that cannot be written costs one warning line, never the run.",
    )
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (a team server: http://HOST:5000); null = $MLFLOW_TRACKING_URI, else the "
        "SQLite file <output.dir>/mlflow.db with artifacts in <output.dir>/mlartifacts.",
    )
    experiment: str = Field("tunelab", min_length=1, description="MLflow experiment the run is filed under.")


class OutputConfig(_Section):
    dir: str = Field("runs", description="Parent folder of run directories.")
    name: str | None = Field(None, description="Run directory name; null = <model>-<method>-<timestamp>.")


class RunConfig(_Section):
    task: Task
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=FullMethod)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.task != "classification" and self.model.pooling != "auto":
            raise ValueError("model.pooling applies to classification only")
        if self.data.validation and self.data.validation_split:
            raise ValueError("set data.validation or data.validation_split, not both")
        if self.data.packing and self.task == "classification":
            raise ValueError("data.packing applies to causal_lm and instruction tasks only")
        if self.data.packing and self.method.name in ("prompt", "prefix"):
            # PEFT drops position_ids for prompt tuning, and prefix tuning's cache disables the packed mask.
            raise ValueError(f"data.packing cannot be used with method '{self.method.name}'")
        return self


def method_names() -> list[str]:
    return [m.model_fields["name"].default for m in MethodConfig.__origin__.__args__]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML 1.1 reads 1e-4 as a string; accept it as the number the user meant.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def _method_class(name: str) -> type[BaseModel] | None:
    return next((m for m in MethodConfig.__origin__.__args__ if m.model_fields["name"].default == name), None)  # type: ignore[attr-defined]


def _section_for(loc: list[str]) -> type[BaseModel] | None:
    """The config section a key path points into, e.g. ['method', 'lora'] -> LoraMethod."""
    node: type[BaseModel] | None = RunConfig
    for part in loc:
        if node is RunConfig and part == "method":
            node = None  # the next part is the method tag
            continue
        if node is None:
            node = _method_class(part)
            continue
        field = node.model_fields.get(part)
        node = field.annotation if field and isinstance(field.annotation, type) else None
        if node is not None and not issubclass(node, BaseModel):
            return None
    return node


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    raw_loc = [str(p) for p in first["loc"]]
    # discriminated unions put the tag in the path (method.lora.rank): drop it for the user.
    loc = [raw_loc[0]] + raw_loc[2:] if raw_loc[:1] == ["method"] and len(raw_loc) > 1 and _method_class(raw_loc[1]) else raw_loc
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        section = _section_for(raw_loc[:-1])
        valid = ", ".join(sorted(section.model_fields)) if section else ""
        return f"config key '{key}' is not known; valid keys here: {valid}"
    if first["type"] == "union_tag_invalid":
        return f"config key '{key}.name': unknown method {first['input'].get('name')!r}; choose one of: {', '.join(method_names())}"
    if first["type"] == "value_error":  # a cross-check of several keys: its message names them
        return f"{'config key ' + repr(key) if loc else 'config'}: {first['msg'].removeprefix('Value error, ')}"
    if first["type"] == "missing":
        return f"config key '{key}' is required"
    return f"config key '{key}': {first['msg']} (got {first.get('input')!r})"


def validate_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def read_config_file(path: str | Path, kind: str = "config") -> dict:
    """The raw mapping of a YAML config file (run, compare or sweep), with one-line errors naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (task, model, data, ...)")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    raw = apply_overrides(read_config_file(path), overrides or [])
    try:
        return validate_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
