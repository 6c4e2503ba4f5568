"""The finished runs that a merge or a router is built from: read once, checked together.

A source is one trained run directory. Its task name (the name a merged folder, a router and `--task` use) is
the run's `output.name`, or its folder name; two runs of one name get `-2`, `-3`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir

# PEFT's add_weighted_adapter combines the low-rank factors of plain LoRA. DoRA's learned magnitudes are not
# combined by it (the merged adapter would silently drop them), and QLoRA's base is 4-bit: merged factors
# would be evaluated on a base other than the one they were trained against only if loaded without it.
MERGEABLE = {"lora"}


@dataclass
class Source:
    name: str
    path: Path
    run: RunDir
    cfg: RunConfig
    labels: list[str]

    @property
    def test_file(self) -> str | None:
        return self.cfg.data.test

    @property
    def train_file(self) -> str:
        return self.cfg.data.train


def read_sources(run_dirs: list[Path], need_model: bool = True) -> list[Source]:
    if not run_dirs:
        raise TunelabError("give at least one RUN_DIR")
    sources, seen = [], {}
    for path in run_dirs:
        run = RunDir(path)
        if not run.is_run():
            raise TunelabError(f"{path}: not a run directory (no config.yaml)")
        if need_model and not run.has_model():
            raise TunelabError(f"{path}: has no trained model (run status: {run.status()})")
        cfg = load_config(run.config_path)
        base = cfg.output.name or Path(path).resolve().name
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}-{seen[base]}"
        sources.append(Source(name, Path(path), run, cfg, run.labels()))
    return sources


def base_of(cfg: RunConfig) -> str:
    rev = f"@{cfg.model.revision}" if cfg.model.revision else ""
    return f"{cfg.model.name}{rev}"


def check_same_base(sources: list[Source]) -> None:
    bases = {base_of(s.cfg) for s in sources}
    if len(bases) > 1:
        named = ", ".join(f"{s.path} is on {base_of(s.cfg)}" for s in sources)
        raise TunelabError(f"cannot combine adapters trained on different base models: {named}")


def check_mergeable(sources: list[Source]) -> None:
    """One line naming the reason, or nothing: same base, same technique, one PEFT can combine, same task kind."""
    check_same_base(sources)
    techniques = {s.cfg.method.name for s in sources}
    if len(techniques) > 1:
        named = ", ".join(f"{s.path} is {s.cfg.method.name}" for s in sources)
        raise TunelabError(f"cannot merge adapters of different techniques: {named}")
    technique = techniques.pop()
    if technique not in MERGEABLE:
        raise TunelabError(
            f"cannot merge '{technique}' runs: PEFT's add_weighted_adapter combines plain LoRA adapters only "
            f"({sources[0].path})")
    for s in sources:
        if getattr(s.cfg.method, "use_dora", False):
            raise TunelabError(f"{s.path}: DoRA adapters cannot be merged (PEFT's add_weighted_adapter would drop "
                               "their learned magnitudes); train with use_dora: false")
    kinds = {s.cfg.task == "classification" for s in sources}
    if len(kinds) > 1:
        named = ", ".join(f"{s.path} is {s.cfg.task}" for s in sources)
        raise TunelabError(f"cannot merge a classification run with a language-model run: {named}")


def output_folder(output: str | Path, kind: str) -> Path:
    """The --output of `tunelab merge` or `route build`: new, or a folder of the same kind (rebuilt in place);
    anything else there is refused in one line rather than replaced."""
    output = Path(output)
    same_kind = RunDir(output).is_merge() if kind == "merge" else RunDir(output).is_router()
    if output.exists() and not same_kind:
        raise TunelabError(f"{output} exists and is not a {kind} folder; pick another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output
