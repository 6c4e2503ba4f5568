"""Lineage of a registered model: data files (path, sha256) -> training run (id, config, metrics) -> model
version -> exports -> where it is served.

Everything is read from the MLflow store, so the chain holds on a team server as well as on the embedded
store, and does not depend on the run directory still being on this disk:

  data      the training run's dataset inputs (each with the file's full sha256 in its profile)
  run       the run's params (the resolved config), its final metrics, its tags
  version   the model version, its tags and aliases
  exports   every version of any model registered from an export of the same training run, and every
            export folder logged under the run's `exports/` artifacts
  served    what servers recorded on the version (registry.record_serving: the `tunelab.served` tag)
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.track.registry import aliases_of, get_version, open_client, parse_reference, registry_uri

HEADLINE = ("test.accuracy", "test.f1_macro", "test.loss", "test.perplexity", "train.wall_s", "train.steps")


def lineage(ref: str, uri: str | None = None) -> dict:
    reference = parse_reference(ref)
    store = registry_uri(uri)
    client = open_client(store)
    mv = get_version(client, reference)
    chain: dict = {
        "reference": str(reference),
        "tracking_uri": store,
        "model_version": {
            "name": mv.name, "version": str(mv.version), "aliases": aliases_of(client, mv.name, mv.version),
            "kind": mv.tags.get("tunelab.kind", "run"), "source": mv.source, "run_id": mv.run_id,
            "created": mv.creation_timestamp, "tags": dict(sorted(mv.tags.items())),
        },
    }
    chain["data"], chain["run"] = _run(client, mv.run_id)
    chain["exports"] = _exports(client, mv)
    chain["served"] = json.loads(mv.tags.get("tunelab.served", "[]"))
    return chain


def _run(client, run_id: str | None) -> tuple[list[dict], dict]:
    if not run_id:
        return [], {}
    run = client.get_run(run_id)
    data = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        ds = item.dataset
        profile = json.loads(ds.profile or "{}")
        source = json.loads(ds.source or "{}")
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        data.append({"split": context, "name": ds.name, "path": source.get("uri"),
                     "sha256": profile.get("sha256") or ds.digest})
    order = {"train": 0, "validation": 1, "test": 2}
    data.sort(key=lambda d: order.get(d["split"], 3))
    params = run.data.params
    info = {
        "run_id": run_id, "run_name": run.info.run_name, "status": run.info.status,
        "experiment_id": run.info.experiment_id, "run_dir": run.data.tags.get("tunelab.run_dir"),
        "git_commit": run.data.tags.get("tunelab.git_commit"),
        "config": {k: params[k] for k in sorted(params)},
        "metrics": {k: run.data.metrics[k] for k in HEADLINE if k in run.data.metrics},
        "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
    }
    return data, info


def _exports(client, mv) -> list[dict]:
    """Exports of the same training run: registered export versions, and export folders in the run's artifacts."""
    if not mv.run_id:
        return []
    found, seen = [], set()
    for other in client.search_model_versions(f"run_id='{mv.run_id}'"):
        if other.tags.get("tunelab.kind") != "export":
            continue
        folder = other.source.rstrip("/").rsplit("/", 1)[-1]
        seen.add(folder)
        found.append({"folder": folder, "format": other.tags.get("export.format"),
                      "registered_as": f"{other.name}/{other.version}",
                      "parity": {k: v for k, v in other.tags.items() if k.startswith("parity.")},
                      "served": json.loads(other.tags.get("tunelab.served", "[]"))})
    try:
        logged = client.list_artifacts(mv.run_id, "exports")
    except Exception:  # noqa: BLE001 -- a run without exports has no such folder on some stores
        logged = []
    for item in logged:
        folder = Path(item.path).name
        if item.is_dir and folder not in seen:
            found.append({"folder": folder, "format": None, "registered_as": None, "parity": {}, "served": []})
    return found


def format_lineage(chain: dict) -> list[str]:
    """The chain as terminal lines, top (data) to bottom (serving)."""
    mv, run = chain["model_version"], chain["run"]
    lines = ["data"]
    for d in chain["data"] or [{"split": "?", "path": "(no dataset inputs logged)", "sha256": ""}]:
        lines.append(f"  {d['split']:<10} {d['path']}  sha256 {d['sha256']}")
    lines.append("  -> training run")
    if run:
        lines.append(f"  {run['run_id']}  {run['run_name']}  ({run['status'].lower()})")
        cfg = run["config"]
        lines.append(f"  config: task {cfg.get('task')}, model {cfg.get('model.name')}, method {cfg.get('method.name')}, "
                     f"lr {cfg.get('train.lr')}, seed {cfg.get('train.seed')}")
        if run["metrics"]:
            lines.append("  metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in run["metrics"].items()))
        if run.get("run_dir"):
            lines.append(f"  run directory: {run['run_dir']}")
    lines.append("  -> model version")
    alias = f"  aliases: {', '.join(mv['aliases'])}" if mv["aliases"] else ""
    lines.append(f"  {mv['name']} version {mv['version']} ({mv['kind']}){alias}")
    lines.append("  -> exports")
    lines += [f"  {e['folder']}  format {e['format'] or '?'}" + (f"  registered as {e['registered_as']}"
              if e["registered_as"] else "") for e in chain["exports"]] or ["  none"]
    lines.append("  -> served")
    served = chain["served"] + [dict(s, export=e["folder"]) for e in chain["exports"] for s in e["served"]]
    lines += [f"  {s['where']} as '{s['served_as']}' since {s['since']}" + (f" (export {s['export']})" if s.get("export")
              else "") for s in served] or ["  not recorded by any server"]
    return lines
