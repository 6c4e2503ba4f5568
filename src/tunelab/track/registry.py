"""The MLflow Model Registry for tunelab models: register a run or an export, name versions with aliases,
and resolve `registry:NAME@ALIAS` to a local directory, offline.

A registered version's artifact is a folder in its training run's MLflow artifacts:

  tunelab-run/               a run directory without its checkpoints: config.yaml, manifest.json, labels.json,
                             metrics.json, model/ (adapter or backbone, head, tokenizer). Every command that
                             takes RUN_DIR loads it as it is.
  exports/<folder name>/     an export folder as `tunelab export` wrote it (export.json and its files)

The version's source is that folder and its run_id the training run, so the registry and the run link both
ways (the run directory's manifest.json holds the MLflow run id). Nothing here uses MLflow's model flavours:
loading goes through tunelab's own loader, which reads the base model named in config.yaml from the bundled
packages or a local folder and never from a hub (MLflow's PEFT flavour downloads the base at load time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir
from tunelab.track.tracking import open_client, tracking_uri

PREFIX = "registry:"
RUN_ARTIFACT = "tunelab-run"
_REF = re.compile(r"^(?P<name>[A-Za-z0-9][\w.\-]*)(?:@(?P<alias>[A-Za-z_][\w\-]*)|/(?P<version>[0-9]+))?$")


@dataclass
class Reference:
    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return self.name + (f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else "")


def parse_reference(text: str) -> Reference:
    """`NAME`, `NAME@ALIAS` or `NAME/VERSION`, with or without the `registry:` prefix."""
    m = _REF.match(text.removeprefix(PREFIX).strip())
    if not m:
        raise TunelabError(f"'{text}' is not a registry reference; write NAME@ALIAS or NAME/VERSION "
                           "(e.g. registry:sentiment@champion)")
    return Reference(m["name"], m["alias"], m["version"])


def registry_uri(uri: str | None = None, store_dir: str | Path = "runs", must_exist: bool = True) -> str:
    """--uri, else $MLFLOW_TRACKING_URI, else the embedded store under ./runs. Reading commands refuse a SQLite
    file that does not exist instead of creating an empty registry."""
    chosen = tracking_uri(uri, store_dir)
    if must_exist and chosen.startswith("sqlite:///") and not Path(chosen.removeprefix("sqlite:///")).is_file():
        raise TunelabError(f"no MLflow store at {chosen.removeprefix('sqlite:///')}: train a run with tracking on "
                           "(the default), or point --uri / MLFLOW_TRACKING_URI at your store")
    return chosen


# --------------------------------------------------------------------------- looking versions up


def _names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models())


def get_version(client, ref: Reference):
    """The model version a reference names; a bad one is one line naming what exists."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(ref.name)
    except MlflowException:
        names = _names(client)
        raise TunelabError(f"registry: no model '{ref.name}'; registered models: "
                           f"{', '.join(names) if names else 'none yet (tunelab registry register RUN_DIR --name NAME)'}") from None
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{ref.name}'")))
    aliases = dict(sorted((model.aliases or {}).items()))
    known = (f"aliases: {', '.join(f'{a} (v{v})' for a, v in aliases.items()) or 'none'}; "
             f"versions: {', '.join(map(str, versions)) or 'none'}")
    if ref.alias:
        if ref.alias not in aliases:
            raise TunelabError(f"registry: model '{ref.name}' has no alias '{ref.alias}'; {known}")
        return client.get_model_version(ref.name, str(aliases[ref.alias]))
    if ref.version:
        if int(ref.version) not in versions:
            raise TunelabError(f"registry: model '{ref.name}' has no version {ref.version}; {known}")
        return client.get_model_version(ref.name, ref.version)
    if not versions:
        raise TunelabError(f"registry: model '{ref.name}' has no versions")
    return client.get_model_version(ref.name, str(versions[-1]))


def aliases_of(client, name: str, version: str) -> list[str]:
    model = client.get_registered_model(name)
    return sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(version))


# --------------------------------------------------------------------------- resolving, offline


@dataclass
class ResolvedModel:
    path: Path  # a local run directory (tunelab-run) or export folder
    name: str
    version: str
    run_id: str | None
    kind: str  # "run" or "export"


def resolve_reference(ref: str, uri: str | None = None) -> ResolvedModel:
    """`registry:NAME@ALIAS` -> a local directory that every RUN_DIR/EXPORT_DIR command loads.

    A version on the embedded store (or any file:// artifact store) is read where it lies; one on a remote
    artifact store is downloaded once into $TUNELAB_HOME/registry/NAME/VERSION and read from there after, so
    a server restarts offline. Loading the model never reaches a model hub (see the module docstring).
    """
    reference = parse_reference(ref)
    client = open_client(registry_uri(uri))
    mv = get_version(client, reference)
    kind = mv.tags.get("tunelab.kind", "run")
    source = mv.source
    if source.startswith("file://") or source.startswith("/"):
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(source).path)) if source.startswith("file://") else Path(source)
        if not path.is_dir():
            raise TunelabError(f"registry: {reference} (version {mv.version}) points at {path}, which is gone")
    else:
        path = _download(mv, source)
    return ResolvedModel(path, mv.name, str(mv.version), mv.run_id, kind)


def _download(mv, source: str) -> Path:
    from tunelab.models.registry import tunelab_home

    target = tunelab_home() / "registry" / mv.name / str(mv.version)
    if (target / ".complete").is_file():
        return target / "artifact"
    import mlflow.artifacts

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp)))
    except Exception as err:  # noqa: BLE001 -- offline, or the store is gone: say which version failed
        shutil.rmtree(tmp, ignore_errors=True)
        raise TunelabError(f"registry: cannot download {mv.name} version {mv.version} from {source} "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    local.rename(tmp / "artifact")
    (tmp / ".complete").write_text(source)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target / "artifact"


def resolve_source(arg: str | Path, uri: str | None = None) -> Path:
    """A command's RUN_DIR/EXPORT_DIR argument: a path as given, or a `registry:` reference resolved."""
    text = str(arg)
    if text.startswith(PREFIX):
        return resolve_reference(text, uri).path
    return Path(arg)


# --------------------------------------------------------------------------- registering


def source_kind(path: Path) -> str:
    if (path / "export.json").is_file():
        return "export"
    if RunDir(path).is_run():
        return "run"
    raise TunelabError(f"{path}: neither a run directory (config.yaml, manifest.json) nor an export (export.json)")


def export_source_run(export_dir: Path) -> Path:
    """The run directory an export was made from, as export.json records it (`source_run`, or `source.run_dir`)."""
    info = json.loads((export_dir / "export.json").read_text())
    source = info.get("source_run") or info.get("run_dir") or info.get("source")
    if isinstance(source, dict):
        source = source.get("run_dir") or source.get("path")
    if not source:
        raise TunelabError(f"{export_dir / 'export.json'}: does not name the run it was exported from")
    path = Path(source)
    return path if path.is_absolute() or path.is_dir() else (export_dir / path)


def _training_run(client, run: RunDir, uri: str, console) -> str:
    """The MLflow run id of a run directory in this store; a run trained with tracking off (or into
    another store) is logged now from its directory, so the version still points at a run."""
    from mlflow.exceptions import MlflowException

    from tunelab.track.tracking import track_finished_run

    tracked = run.manifest().get("mlflow") or {}
    if tracked.get("run_id") and tracked.get("tracking_uri") == uri:
        try:
            client.get_run(tracked["run_id"])
            return tracked["run_id"]
        except MlflowException:
            pass
    run_id = track_finished_run(run, uri, console)
    if run_id is None:
        raise TunelabError(f"registry: could not log {run.path} to {uri} (see the warning above)")
    return run_id


def version_tags(run: RunDir, export_dir: Path | None) -> dict[str, str]:
    """What a version says about itself: technique, base model, task, data digests, test metrics, parity."""
    from tunelab.config import load_config
    from tunelab.track.tracking import final_metrics

    cfg = load_config(run.config_path)
    tags = {"tunelab.kind": "export" if export_dir else "run", "technique": cfg.method.name,
            "base_model": cfg.model.name, "task": cfg.task, "tunelab.run_dir": str(run.path.resolve())}
    for split, entry in (run.manifest().get("data") or {}).items():
        tags[f"data.{split}.path"] = str(entry.get("path"))
        tags[f"data.{split}.sha256"] = str(entry.get("sha256"))
    metrics = json.loads(run.metrics_path.read_text())
    headline = ("accuracy", "f1_macro", "loss", "perplexity")
    for key, value in final_metrics(metrics).items():
        if key.startswith("test.") and key.removeprefix("test.") in headline:
            tags[key] = f"{value:.6g}"
    if export_dir is not None:
        info = json.loads((export_dir / "export.json").read_text())
        tags["export.format"] = str(info.get("format"))
        tags["tunelab.export_dir"] = str(export_dir.resolve())
        for key, value in _flat_numbers(info.get("parity") or {}, "parity.").items():
            tags[key] = f"{value:.6g}"
    return tags


def _flat_numbers(obj: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def store_for(run: RunDir, uri: str | None = None) -> str:
    """Where a run's versions go: --uri, else $MLFLOW_TRACKING_URI, else the store the run was tracked in,
    else the embedded store under ./runs."""
    manifest_uri = (run.manifest().get("mlflow") or {}).get("tracking_uri")
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or manifest_uri or registry_uri(None, must_exist=False)


def source_run(source: Path) -> RunDir:
    """The training run of a run directory or an export folder."""
    return RunDir(export_source_run(source) if source_kind(source) == "export" else source)


def register(source: str | Path, name: str, uri: str | None = None, console=None):
    """A new version of model `name` (created if new) from a run directory or an export folder."""
    from mlflow.exceptions import MlflowException
    from rich.console import Console

    console = console or Console(stderr=True)
    if not _REF.match(name) or "@" in name or "/" in name:
        raise TunelabError(f"--name '{name}': use letters, digits, '.', '_' and '-' (aliases come later: NAME@ALIAS)")
    source = Path(source)
    if not source.is_dir():
        raise TunelabError(f"{source}: no such directory")
    kind = source_kind(source)
    run = source_run(source)
    if not run.is_complete():
        raise TunelabError(f"{run.path}: the run did not complete (no metrics.json); only finished runs register")
    if kind == "run" and not run.has_model():
        raise TunelabError(f"{run.path}: has no trained model (model/backbone)")
    store = store_for(run, uri)
    client = open_client(store)
    run_id = _training_run(client, run, store, console)
    if kind == "run":
        for path in (run.config_path, run.manifest_path, run.labels_path, run.metrics_path, run.untuned_eval_path):
            if path.is_file():
                client.log_artifact(run_id, str(path), RUN_ARTIFACT)
        client.log_artifacts(run_id, str(run.model_dir), f"{RUN_ARTIFACT}/{run.model_dir.name}")
        artifact = RUN_ARTIFACT
    else:
        artifact = f"exports/{source.resolve().name}"
        client.log_artifacts(run_id, str(source), artifact)
    tags = version_tags(run, source if kind == "export" else None)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"task": tags["task"]},
                                       description=f"tunelab {tags['task']} model on {tags['base_model']}")
    artifact_uri = client.get_run(run_id).info.artifact_uri
    return client.create_model_version(name, source=f"{artifact_uri}/{artifact}", run_id=run_id, tags=tags,
                                       description=f"{kind} {source}")


def set_alias(ref: str, version: str, uri: str | None = None) -> tuple[str | None, str]:
    """Point NAME@ALIAS at VERSION; returns (the version it pointed at before, or None; the new one)."""
    reference = parse_reference(ref)
    if not reference.alias:
        raise TunelabError(f"'{ref}': name the alias to set, e.g. {reference.name}@champion")
    client = open_client(registry_uri(uri))
    get_version(client, Reference(reference.name, version=str(version)))  # one line if either is unknown
    model = client.get_registered_model(reference.name)
    before = (model.aliases or {}).get(reference.alias)
    client.set_registered_model_alias(reference.name, reference.alias, str(version))
    return (str(before) if before is not None else None), str(version)


def record_serving(resolved: ResolvedModel, where: str, served_as: str, uri: str | None = None) -> None:
    """For servers: note on the version that it is served at `where` under the model name `served_as`.
    `tunelab registry lineage` shows these; the tag is tunelab.served, a JSON list."""
    from datetime import datetime, timezone

    client = open_client(registry_uri(uri))
    mv = client.get_model_version(resolved.name, resolved.version)
    served = json.loads(mv.tags.get("tunelab.served", "[]"))
    served = [s for s in served if s.get("where") != where or s.get("served_as") != served_as]
    served.append({"where": where, "served_as": served_as,
                   "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    client.set_model_version_tag(resolved.name, resolved.version, "tunelab.served", json.dumps(served[-20:]))
