"""Commands on the MLflow store: the model registry (register, alias, list, show, lineage) and `tunelab ui`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from tunelab.cli.common import app, err, out
from tunelab.errors import TunelabError

registry_app = typer.Typer(no_args_is_help=True, help="Name model versions in the MLflow Model Registry, alias "
                           "them (champion, challenger) and trace their lineage.")
app.add_typer(registry_app, name="registry")

URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)."


@registry_app.command("register")
def register_cmd(
    source: Path = typer.Argument(..., help="A finished run directory, or an export folder (export.json)."),
    name: str = typer.Option(..., "--name", help="Registered model name, e.g. sentiment."),
    uri: Optional[str] = typer.Option(None, "--uri", help=URI_HELP + " A run directory's own store comes first."),
    alias: Optional[str] = typer.Option(None, "--alias", help="Also point this alias at the new version, e.g. champion."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write {name, version, run_id, alias} here as JSON."),
):
    """Make a new model version whose artifact is the run's adapter/model, or the export."""
    from tunelab.track.registry import register, set_alias, source_run, store_for
    from tunelab.runtime.atomic import atomic_write_json as write_json_atomic

    mv = register(source, name, uri, err)
    out.print(f"registered {mv.name} version {mv.version} (run {mv.run_id})")
    if alias:
        # In the store the version went to, which for a run directory may not be the default one
        set_alias(f"{mv.name}@{alias}", str(mv.version), store_for(source_run(source), uri))
        out.print(f"{mv.name}@{alias} -> version {mv.version}")
    else:
        out.print(f"set an alias with: tunelab registry alias {mv.name}@champion {mv.version}")
    if output is not None:
        write_json_atomic(output, {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "alias": alias})



@registry_app.command("alias")
def alias_cmd(
    ref: str = typer.Argument(..., help="NAME@ALIAS, e.g. sentiment@champion."),
    version: int = typer.Argument(..., help="The version the alias will point at.", min=1),
    uri: Optional[str] = typer.Option(None, "--uri", help=URI_HELP),
):
    """Point an alias at a version (moving it if it pointed elsewhere)."""
    from tunelab.track.registry import parse_reference, set_alias

    before, now = set_alias(ref, str(version), uri)
    reference = parse_reference(ref)
    moved = f"moved from version {before} to {now}" if before and before != now else f"now version {now}"
    out.print(f"{reference.name}@{reference.alias}: {moved}")


@registry_app.command("list")
def list_cmd(uri: Optional[str] = typer.Option(None, "--uri", help=URI_HELP)):
    """Registered models, their versions and aliases."""
    from tunelab.track.registry import open_client, registry_uri

    client = open_client(registry_uri(uri))
    table = Table(show_header=True)
    for col in ("name", "versions", "aliases", "latest", "technique", "base model", "test metric"):
        table.add_column(col)
    models = sorted(client.search_registered_models(), key=lambda m: m.name)
    for m in models:
        versions = sorted(client.search_model_versions(f"name='{m.name}'"), key=lambda v: int(v.version))
        latest = versions[-1] if versions else None
        tags = latest.tags if latest else {}
        metric = next((f"{k.removeprefix('test.')} {v}" for k, v in sorted(tags.items()) if k.startswith("test.")), "")
        aliases = ", ".join(f"{a}→v{v}" for a, v in sorted((m.aliases or {}).items()))
        table.add_row(m.name, str(len(versions)), aliases, f"v{latest.version}" if latest else "",
                      tags.get("technique", ""), tags.get("base_model", ""), metric)
    out.print(table if models else "no registered models yet: tunelab registry register RUN_DIR --name NAME")


@registry_app.command("show")
def show_cmd(
    ref: str = typer.Argument(..., help="NAME (every version), NAME@ALIAS or NAME/VERSION."),
    uri: Optional[str] = typer.Option(None, "--uri", help=URI_HELP),
):
    """One version's tags, source and run; or, for a bare NAME, all its versions."""
    from tunelab.track.registry import aliases_of, get_version, open_client, parse_reference, registry_uri

    reference = parse_reference(ref)
    client = open_client(registry_uri(uri))
    if not reference.alias and not reference.version:
        get_version(client, reference)  # one line if the name is unknown
        table = Table(title=reference.name, show_header=True)
        for col in ("version", "aliases", "kind", "technique", "test metrics", "run id"):
            table.add_column(col)
        for v in sorted(client.search_model_versions(f"name='{reference.name}'"), key=lambda v: int(v.version)):
            metrics = ", ".join(f"{k.removeprefix('test.')} {x}" for k, x in sorted(v.tags.items()) if k.startswith("test."))
            table.add_row(v.version, ", ".join(aliases_of(client, v.name, v.version)), v.tags.get("tunelab.kind", ""),
                          v.tags.get("technique", ""), metrics, v.run_id or "")
        out.print(table)
        return
    mv = get_version(client, reference)
    out.print(f"[bold]{mv.name} version {mv.version}[/]  aliases: {', '.join(aliases_of(client, mv.name, mv.version)) or 'none'}")
    out.print(f"source  {escape(mv.source)}")
    out.print(f"run     {mv.run_id}")
    table = Table(show_header=True)
    table.add_column("tag")
    table.add_column("value")
    for key, value in sorted(mv.tags.items()):
        table.add_row(key, escape(value))
    out.print(table)


@registry_app.command("lineage")
def lineage_cmd(
    ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION."),
    output: Optional[Path] = typer.Option(None, "--output", help="Where the JSON goes (default runs/lineage/NAME-vVERSION.json)."),
    uri: Optional[str] = typer.Option(None, "--uri", help=URI_HELP),
):
    """Data files (sha256) -> training run -> model version -> exports -> where it is served; also as JSON."""
    from tunelab.track.lineage import format_lineage, lineage

    chain = lineage(ref, uri)
    for line in format_lineage(chain):
        out.print(escape(line), highlight=False, soft_wrap=True)
    mv = chain["model_version"]
    path = output or Path("runs") / "lineage" / f"{mv['name']}-v{mv['version']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(chain, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
    out.print(f"lineage written to {path}")


@app.command()
def ui(
    store: Path = typer.Option(Path("runs"), "--dir", help="Run folder holding mlflow.db (track.uri unset)."),
    port: int = typer.Option(5000, "--port", min=0, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 127.0.0.1 keeps it on this machine."),
):
    """Browse tracked runs and registered models: starts the MLflow UI on the embedded store."""
    from tunelab.track.ui import ui_command

    command = ui_command(store, host, port)
    err.print(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it)")
    try:
        raise typer.Exit(subprocess.call(command))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
