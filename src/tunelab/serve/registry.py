"""The models a server holds: many runs on one copy of each base model, loaded and unloaded by name.

One copy of the base. Every run that shares a base model (same model, revision, task kind and quantization)
is built on the same weight tensors: the base backbone is loaded once, and each run gets its own *module
tree* whose parameters and buffers are the base's very tensors (a deep copy with every tensor pre-entered
in the memo). The technique then wraps that tree in place -- PEFT injects LoRA/DoRA/IA3 layers or prompt and
prefix encoders, the bottleneck adapters wrap projections -- without touching the shared weights, so this
works for every tunelab technique and the `model` field of a request simply picks which tree runs.
Full fine-tuning runs own all their weights and are loaded whole.

A reload under the same name builds a new ServedModel with a higher version and swaps it in; requests
already holding the old one finish on it, and every request admitted after the swap gets the new one (the
batcher groups by the ServedModel object, never by name), so nothing stale is served after a reload.

served.json (in --log-dir) records what was loaded, from where, with the sha256 of its weights: the
lineage a model registry reads. Its schema is in docs/10-deployment.md.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from torch import nn

from tunelab.errors import TunelabError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SERVED_SCHEMA = 1
ROUTER_NAME = "auto"  # what a router folder is served as unless NAME=PATH names it


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def share_weights(module: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors (no weight is copied)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def parse_source(spec: str) -> tuple[str, Path]:
    """'NAME=PATH' or 'PATH' (named after its folder; a router folder is named `auto`)."""
    from tunelab.runtime.run_dir import RunDir

    name, sep, path = spec.partition("=")
    if not sep or "/" in name:
        name, path = (ROUTER_NAME if RunDir(Path(spec)).is_router() else Path(spec).name), spec
    if not NAME_PATTERN.match(name):
        raise TunelabError(f"model name '{name}' (from {spec}): use letters, digits, '.', '_', ':' or '-'")
    return name, Path(path)


@dataclass
class ServedModel:
    """One loaded run, under the name requests use."""

    name: str
    source: Path
    trained: object  # inference.trained.TrainedModel
    version: int
    base_key: str | None
    loaded_at: str = field(default_factory=now_iso)
    lineage: dict = field(default_factory=dict)
    loaded_unix: float = field(default_factory=time.time)

    @property
    def task(self) -> str:
        return self.trained.task

    @property
    def labels(self) -> list[str]:
        return self.trained.labels

    @property
    def tokenizer(self):
        return self.trained.tokenizer

    @property
    def template(self) -> str | None:
        """The instruction format recorded in the run: 'chat' (the tokenizer's chat template) or 'alpaca'."""
        return self.trained.template

    @property
    def method(self) -> str:
        return self.trained.cfg.method.name

    @property
    def base_model(self) -> str:
        return self.trained.cfg.model.name

    @property
    def context_length(self) -> int:
        """Tokens a sequence may hold, less what prompt or prefix tuning puts in front of it."""
        backbone = self.trained.model.backbone
        limit = getattr(backbone.config, "max_position_embeddings", None) or 2048
        peft_cfg = getattr(backbone, "active_peft_config", None)
        return limit - (getattr(peft_cfg, "num_virtual_tokens", 0) or 0)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt as the run's generate path makes them: a rendered chat template carries its
        own special tokens, so none are added again; other prompts get the tokenizer's usual ones."""
        return self.tokenizer(text, add_special_tokens=self.template != "chat")["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation, rendered with the template the run was trained with."""
        from tunelab.data.templates import render_prompt

        if self.task != "instruction":
            raise TunelabError(f"model '{self.name}' is a {self.task} run, not an instruction-tuned one: "
                               "send it text to continue (completions), not messages")
        if self.template == "chat":
            return self.encode(render_prompt({"messages": messages}, self.tokenizer, "chat"))
        if len(messages) != 1 or messages[0].get("role") != "user":  # the Alpaca format has no turns
            raise TunelabError(f"model '{self.name}' was trained with the alpaca template, which has no turns or "
                               "system prompt: send one user message")
        return self.encode(render_prompt({"instruction": messages[0]["content"], "input": ""}, self.tokenizer,
                                         "alpaca"))

    def weight_pointers(self) -> dict[str, int]:
        """data_ptr of every backbone weight by name: equal pointers mean one copy in memory."""
        return {n: p.data_ptr() for n, p in self.trained.model.backbone.named_parameters()}


@dataclass
class RoutedModel:
    """A router folder, loaded: its name (`auto`) picks, per input, which of its task adapters answers. The
    adapters are ordinary ServedModels under their task names; this holds only the router and its embedder."""

    name: str
    source: Path
    router: object  # adapters.router.Router, its encoder already loaded
    version: int
    loaded_at: str = field(default_factory=now_iso)
    lineage: dict = field(default_factory=dict)
    loaded_unix: float = field(default_factory=time.time)
    base_key: None = None  # holds no pooled base: its adapters do
    trained: None = None

    task = "classification"
    method = "router"

    @property
    def adapters(self) -> list[str]:
        return list(self.router.tasks)

    @property
    def base_model(self) -> str:
        return self.router.recipe["encoder"]

    @property
    def labels(self) -> list[str]:
        """Every adapter's labels, in task order (each input gets only its own adapter's)."""
        return list(dict.fromkeys(label for t in self.router.recipe["tasks"] for label in t.get("labels", [])))


def router_runs(folder: Path) -> tuple[object, dict[str, Path]]:
    """A router folder, read (its encoder not yet loaded), and its task runs by task name, checked before
    anything loads: one line naming the folder when a run is gone."""
    from tunelab.adapters.router import Router
    from tunelab.runtime.run_dir import RunDir

    router = Router(folder)
    runs = {task: router.run_dir(task) for task in router.tasks}
    for task, run in runs.items():
        if not RunDir(run).is_run():
            raise TunelabError(f"{folder}: router task '{task}': {run} is not a run directory (no config.yaml)")
    return router, runs


def _weights_sha256(run) -> dict[str, str]:
    from tunelab.runtime.run_dir import sha256

    files = sorted(run.model_dir.rglob("*.safetensors"))
    return {str(f.relative_to(run.path)): sha256(f) for f in files}


class BasePool:
    """Base backbones by what makes two runs' bases the same weights, with the names that use each."""

    def __init__(self):
        self._bases: dict[str, tuple[nn.Module, set[str]]] = {}

    @staticmethod
    def key(cfg, pretrained_kwargs: dict) -> str:
        kind = "classification" if cfg.task == "classification" else "lm"
        from tunelab.models.registry import resolve_model

        quant = {k: (v.to_dict() if hasattr(v, "to_dict") else str(v)) for k, v in sorted(pretrained_kwargs.items())}
        return json.dumps([resolve_model(cfg.model.name), cfg.model.revision, cfg.model.trust_remote_code,
                           cfg.model.attention, kind, quant], sort_keys=True, default=str)

    def acquire(self, key: str, name: str, cfg, pretrained_kwargs: dict) -> nn.Module:
        if key not in self._bases:
            from tunelab.models.loading import load_task_model

            # The head is the run's own; only the backbone is kept. num_labels=2 builds a throwaway head.
            model, _, _ = load_task_model(cfg.model, cfg.task, num_labels=2, pretrained_kwargs=pretrained_kwargs)
            self._bases[key] = (model.backbone.eval(), set())
        base, users = self._bases[key]
        users.add(name)
        return share_weights(base)

    def release(self, key: str | None, name: str) -> None:
        if key in self._bases:
            users = self._bases[key][1]
            users.discard(name)
            if not users:
                del self._bases[key]  # the last run on this base is gone: let its weights be freed

    def __len__(self) -> int:
        return len(self._bases)


class ModelRegistry:
    """Thread-safe name -> ServedModel map; loads go through the pool so bases are shared."""

    def __init__(self, served_json: Path | None = None, trust_remote_code: bool = False):
        self.trust_remote_code = trust_remote_code  # from the command line only (inference/trained.py)
        self._models: dict[str, ServedModel] = {}
        self._pool = BasePool()
        self._lock = threading.RLock()
        self._versions: dict[str, int] = {}
        self._history: list[dict] = []  # every load and unload, for served.json
        self.served_json = served_json
        self.started = now_iso()

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return list(self._models)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    @property
    def bases_loaded(self) -> int:
        return len(self._pool)

    def load(self, name: str, source: str | Path) -> ServedModel:
        """Load a run directory, or a merged or adapter export folder, under `name`, replacing any model of
        that name."""
        from tunelab.export import is_export
        from tunelab.inference.trained import TrainedModel, load_run_config, recorded_precision
        from tunelab.runtime.run_dir import RunDir

        path = Path(source)
        run = RunDir(path)
        if run.is_router():
            return self._load_router(name, path)
        if is_export(path) and not run.is_run():
            return self._load_export(name, path)
        if not run.is_run():
            raise TunelabError(f"{path}: not a run directory (no config.yaml) nor an export folder (no export.json)")
        cfg = load_run_config(run, self.trust_remote_code)
        with self._lock:
            key, backbone = self._shared_base(name, cfg, precision=recorded_precision(run, cfg)[0])
            try:
                trained = TrainedModel(path, base_backbone=backbone, trust_remote_code=self.trust_remote_code)
            except BaseException:
                self._release_unless_used(key, name)
                raise
            manifest = run.manifest() if run.manifest_path.is_file() else {}
            lineage = {
                "source_type": "run", "run_status": manifest.get("status"), "run_finished": manifest.get("finished"),
                "git_commit": manifest.get("git_commit"), "weights_sha256": _weights_sha256(run),
            }
            return self._install(name, path, trained, key, cfg, lineage)

    def _shared_base(self, name: str, cfg, adapter: bool = True,
                     precision: str | None = None) -> tuple[str | None, nn.Module | None]:
        """The pooled base backbone for a technique that wraps one; (None, None) when the model owns every
        weight (full fine-tuning, a merged export). A run's base loads in the precision the run recorded."""
        if cfg.method.name == "full" or not adapter:
            return None, None
        from tunelab.methods import get_method
        from tunelab.runtime.hardware import resolve_precision

        precision = precision or resolve_precision(cfg.train.precision)
        kwargs = get_method(cfg.method.name).pretrained_kwargs(cfg.method, precision)
        key = BasePool.key(cfg, kwargs)
        return key, self._pool.acquire(key, name, cfg, kwargs)

    def _load_export(self, name: str, path: Path) -> ServedModel:
        """A merged export owns its weights; an adapter export is built on the shared copy of its base, like a
        run. Every file is checked against its sha256 in export.json before anything is served."""
        from tunelab.export import load_export, read_record
        from tunelab.export.loading import export_config

        record = read_record(path)
        cfg = export_config(record)
        with self._lock:
            key, backbone = self._shared_base(name, cfg, adapter=record["format"] == "adapter")
            try:
                trained = load_export(path, verify=True, base_backbone=backbone)
            except BaseException:
                self._release_unless_used(key, name)
                raise
            source = record["source"]
            lineage = {
                "source_type": "export", "export_format": record["format"], "export_created": record.get("created"),
                "source_run": source.get("run"), "run_status": source.get("run_status"), "run_finished": None,
                "git_commit": source.get("git_commit"),
                "weights_sha256": {f: h for f, h in record["files"].items() if f.endswith(".safetensors")},
            }
            return self._install(name, path, trained, key, cfg, lineage)

    def _load_router(self, name: str, path: Path) -> RoutedModel:
        """Each task run under its task name (on the shared base, as any run), then the router under `name`.
        The router's embedder is loaded here, once; requests only run it."""
        router, runs = router_runs(path)
        if name in runs:
            raise TunelabError(f"{path}: the router's name '{name}' is also one of its tasks: name it, e.g. auto={path}")
        with self._lock:
            for task, run in runs.items():
                current = self._models.get(task)
                if current is not None and current.source.resolve() == run.resolve():
                    continue  # already served from this very run (a router reloaded): keep it
                try:
                    self.load(task, run)
                except TunelabError as e:
                    raise TunelabError(f"{path}: router task '{task}': {e}") from None
            router.encoder()
            version = self._versions.get(name, 0) + 1
            self._versions[name] = version
            lineage = {
                "name": name, "version": version, "source": str(path.resolve()), "source_type": "router",
                "adapters": {task: str(run.resolve()) for task, run in runs.items()}, "task": "classification",
                "method": "router", "base_model": router.recipe["encoder"], "loaded_at": now_iso(),
                "unloaded_at": None,
            }
            return self._swap_in(RoutedModel(name, path, router, version, lineage["loaded_at"], lineage))

    def routers_using(self, name: str) -> list[str]:
        return [m.name for m in self._models.values() if isinstance(m, RoutedModel) and name in m.adapters]

    def _install(self, name: str, path: Path, trained, key: str | None, cfg, lineage: dict) -> ServedModel:
        version = self._versions.get(name, 0) + 1
        self._versions[name] = version
        lineage = {
            "name": name, "version": version, "source": str(path.resolve()), **lineage, "task": cfg.task,
            "method": cfg.method.name, "base_model": cfg.model.name, "loaded_at": now_iso(), "unloaded_at": None,
        }
        return self._swap_in(ServedModel(name, path, trained, version, key, lineage["loaded_at"], lineage))

    def _swap_in(self, served):
        old = self._models.get(served.name)
        self._models[served.name] = served
        if old is not None:
            self._retire(old)
        self._history.append(served.lineage)
        self._write_served_json()
        return served

    def unload(self, name: str) -> bool:
        with self._lock:
            routers = self.routers_using(name)
            if routers and name in self._models:
                raise TunelabError(f"model '{name}' answers for router '{routers[0]}': unload '{routers[0]}' first")
            served = self._models.pop(name, None)
            if served is None:
                return False
            self._retire(served)
            self._write_served_json()
            return True

    def _retire(self, served: ServedModel) -> None:
        served.lineage["unloaded_at"] = now_iso()
        self._release_unless_used(served.base_key, served.name)

    def _release_unless_used(self, key: str | None, name: str) -> None:
        current = self._models.get(name)
        if current is None or current.base_key != key:  # a reload on the same base still needs it
            self._pool.release(key, name)

    def _write_served_json(self) -> None:
        if self.served_json is None:
            return
        from tunelab.runtime.atomic import atomic_write_json

        self.served_json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.served_json, {
            "schema": SERVED_SCHEMA, "started": self.started, "updated": now_iso(), "updated_unix": time.time(),
            "loaded": [m.lineage for m in self._models.values()], "history": self._history,
        })
