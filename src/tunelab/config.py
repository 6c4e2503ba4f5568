"""The typed schema of a run, loaded from YAML with dotted command-line overrides.

Every section forbids unknown keys, so a typo (`train.lrr`) stops the run before any work starts, with
one line naming the key and the keys that are valid there (`one_line_error`, which the compare and sweep
sections use too).

The `method:` section is assembled from the technique registry (methods/), so this module stands above the
techniques' config classes and below every stage. It imports no torch: a bad key costs a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from tunelab.errors import ConfigError
from tunelab.methods import METHODS, method_configs

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


# The `method:` section: one config class per technique, each beside its Method in methods/, assembled here
# from the registry. The discriminator is `name`, so a wrong name is one error listing the valid ones.
MethodConfig = Annotated[Union[tuple(method_configs())], Field(discriminator="name")]  # type: ignore[valid-type]


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
    method: MethodConfig = Field(default_factory=lambda: METHODS["full"].config_class())
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
        refusal = METHODS[self.method.name].packing_refusal
        if self.data.packing and refusal:
            raise ValueError(f"data.packing cannot be used with method '{self.method.name}' ({refusal})")
        return self


def method_names() -> list[str]:
    return list(METHODS)


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


# --------------------------------------------------------------------------- one-line errors


def _model_class(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _tagged_union(annotation, discriminator: str | None) -> tuple[str, dict[str, type[BaseModel]]] | None:
    """(discriminator field, tag -> class) when `annotation` is a discriminated union of models, else None."""
    if get_origin(annotation) is Annotated:  # a union inside a container keeps its Field(discriminator=...)
        annotation, *metadata = get_args(annotation)
        discriminator = next((m.discriminator for m in metadata if isinstance(m, FieldInfo) and m.discriminator),
                             discriminator)
    if not discriminator or get_origin(annotation) not in (Union, UnionType):
        return None
    members = [m for m in get_args(annotation) if _model_class(m)]
    # The tag is the field's Literal value (a default may be absent: IntParam's `type` has none).
    return discriminator, {get_args(m.model_fields[discriminator].annotation)[0]: m for m in members}


def _walk(root: type[BaseModel], loc: list) -> tuple[list[str], type[BaseModel] | None, tuple | None]:
    """Follow an error location through the schema: (the key path as the user wrote it, the section it ends in,
    the discriminated union it ends at, if any). The union tags pydantic puts in a location (method.lora.rank,
    space.train.lr.float.low) are dropped: the user never wrote them."""
    keys: list[str] = []
    node: type[BaseModel] | None = root
    union = None
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        field = node.model_fields.get(parts[i]) if node else None
        keys.append(parts[i])
        annotation, discriminator = (field.annotation, field.discriminator) if field else (None, None)
        if get_origin(annotation) is dict and i + 1 < len(parts):  # a mapping: the next part is the user's key
            i += 1
            keys.append(parts[i])
            annotation, discriminator = get_args(annotation)[1], None
        union = _tagged_union(annotation, discriminator)
        if union and i + 1 < len(parts) and parts[i + 1] in union[1]:
            node, union = union[1][parts[i + 1]], None
            i += 2
            continue
        node = _model_class(annotation)
        i += 1
    return keys, node, union


def one_line_error(err: ValidationError, root: type[BaseModel], kind: str = "config", prefix: str = "",
                   tag_nouns: dict[str, str] | None = None) -> str:
    """The first error of a validation, as one line naming the key the user wrote.

    kind: the word before "key" (config, sweep). prefix: the section the root model sits under (sweep,
    compare). tag_nouns: discriminator field -> what a wrong tag is called ("name" -> "method").
    """
    first = err.errors()[0]
    loc = list(first["loc"])
    keys, _, union = _walk(root, loc)
    key = ".".join(([prefix] if prefix else []) + keys) or "(top level)"
    what = f"{kind} key {key!r}"
    error = first["type"]
    if error == "extra_forbidden":
        _, parent, _ = _walk(root, loc[:-1])
        valid = ", ".join(sorted(parent.model_fields)) if parent else ""
        return f"{what} is not known; valid keys here: {valid}"
    if error in ("union_tag_invalid", "union_tag_not_found") and union:
        discriminator, members = union
        choices = ", ".join(members)
        if error == "union_tag_not_found":
            return f"{what} needs a {discriminator}: {choices}"
        noun = (tag_nouns or {}).get(discriminator, discriminator)
        tag = first["input"].get(discriminator) if isinstance(first["input"], dict) else first["input"]
        return f"{kind} key '{key}.{discriminator}': unknown {noun} {tag!r}; choose one of: {choices}"
    if error == "value_error":  # a check of one or several keys: its message names them
        return f"{what if keys or prefix else kind}: {first['msg'].removeprefix('Value error, ')}"
    if error == "missing":
        return f"{what} is required"
    return f"{what}: {first['msg']} (got {first.get('input')!r})"


def validate_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(one_line_error(err, RunConfig, tag_nouns={"name": "method"})) from None


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


# --------------------------------------------------------------------------- multi-task runs


class TaskSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="The task's name: its folder under tasks/ and its --task tag.")
    data: DataConfig = Field(description="This task's own data section: files, columns, max_length, subsets.")
    loss_weight: float = Field(1.0, gt=0, description="Multiplies this task's loss: >1 = its gradients count more.")


class SamplingConfig(_Section):
    strategy: Literal["proportional", "temperature", "round_robin"] = Field(
        "proportional",
        description="Which task each step trains: proportional to training-set size, proportional to size^(1/T) "
        "(temperature), or each task in turn (round_robin).")
    temperature: float = Field(2.0, ge=1.0, description="T for temperature sampling: 1 = proportional, large = uniform.")


class MultiTaskConfig(_Section):
    """A `tasks:` config: one classification head per task on one base model, sharing either one adapter
    (shared_adapter) or only the frozen base, with an adapter per task (adapter_per_task)."""

    task: Literal["classification"] = "classification"
    model: ModelConfig
    method: MethodConfig = Field(default_factory=lambda: METHODS["full"].config_class())
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tasks: list[TaskSpec] = Field(min_length=2, description="Two or more tasks, each with its own data and labels.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    sharing: Literal["shared_adapter", "adapter_per_task"] = Field(
        "shared_adapter",
        description="What the tasks share: shared_adapter = one adapter trained on every task's steps (tasks "
        "help or hurt each other); adapter_per_task = only the frozen base, each task training its own adapter "
        "on its own steps (no interference, k adapters; PEFT techniques only).")
    baselines: dict[str, str] = Field(
        default_factory=dict, description="Task name -> a single-task run directory to compare with in the report.")

    @model_validator(mode="after")
    def _cross_checks(self) -> MultiTaskConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: two tasks share a name ({', '.join(names)})")
        unknown = sorted(set(self.baselines) - set(names))
        if unknown:
            raise ValueError(f"baselines: {', '.join(unknown)} is not a task name ({', '.join(names)})")
        if self.train.max_steps is None:
            raise ValueError("train.max_steps is required with tasks: the budget is counted in steps over all tasks")
        refusal = METHODS[self.method.name].named_adapters_refusal
        if self.sharing == "adapter_per_task" and refusal:
            able = ", ".join(m.name for m in METHODS.values() if m.named_adapters_refusal is None)
            raise ValueError(f"sharing: adapter_per_task keeps one named adapter per task on one base, and method "
                             f"'{self.method.name}' cannot ({refusal}); use one of {able}, or shared_adapter")
        return self

    def task_config(self, spec: TaskSpec) -> RunConfig:
        """The single-task config of one task: what its run directory under tasks/ records."""
        raw = self.model_dump(mode="json", exclude={"tasks", "sampling", "sharing", "baselines"})
        raw["data"] = spec.data.model_dump(mode="json")
        raw["output"]["name"] = spec.name
        return validate_config(raw)


def is_multitask(raw: dict) -> bool:
    return "tasks" in raw


def load_multitask_config(path: str | Path, overrides: list[str] | None = None) -> MultiTaskConfig:
    path = Path(path)
    raw = apply_overrides(read_config_file(path), overrides or [])
    try:
        return MultiTaskConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {one_line_error(err, MultiTaskConfig, tag_nouns={'name': 'method'})}") from None
