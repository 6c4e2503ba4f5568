"""The package's shape, enforced: imports point down (the rules of docs/architecture.md), the run directory has
one owner, `import tunelab` and the command line stay light, and no file grows past ~600 lines.

Each checker runs on the real tree, and once on a planted violation, so it is shown to fail when a rule breaks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
STAGES = {"errors", "runtime", "results", "config", "methods", "models", "data", "plan", "train", "evaluate",
          "inference", "report", "experiments", "export", "serve", "track", "adapters", "monitor", "cli"}
FLOOR = {"errors", "runtime"}

# (stages the rule applies to, stages they must not import, why). Mirrored in docs/architecture.md.
RULES = [
    ({"errors"}, STAGES - {"errors"}, "the floor imports nothing above it"),
    ({"runtime"}, STAGES - FLOOR, "the floor imports nothing above it"),
    ({"results"}, STAGES - FLOOR - {"results"}, "typed results are plain data that every stage, the report "
                                                 "included, can read"),
    ({"methods"}, STAGES - FLOOR - {"methods", "results"}, "config assembles the run schema from the techniques, "
                                                            "so they stand below config and every stage"),
    ({"config"}, STAGES - FLOOR - {"config", "methods"}, "config stands above the technique config classes and "
                                                          "below every stage"),
    ({"data", "models", "methods"}, {"train", "track", "inference", "serve", "export", "monitor", "experiments"},
     "the building blocks never reach up into the stages that use them"),
    ({"plan"}, {"train", "track", "inference", "serve", "export", "monitor", "experiments", "report"},
     "a run is priced before it trains: the training loop imports plan, never the other way"),
    ({"train"}, {"report", "serve", "export", "monitor", "experiments"},
     "training writes a run directory; what reads it comes after"),
    ({"serve"}, {"train", "experiments"}, "a server loads finished runs (inference, adapters, models); it never trains"),
    ({"export", "track"}, {"train"}, "they read finished runs; train may import track to log, not the reverse"),
    ({"monitor"}, {"serve"}, "monitoring reads the logs serve writes instead of importing it"),
    ({"report"}, STAGES - FLOOR - {"report", "results"}, "a report reads files and imports no stage that trains"),
    (STAGES - {"cli", "experiments"}, {"experiments"}, "only the command line imports experiments"),
    (STAGES - {"cli"}, {"cli"}, "the command line is the top: nothing imports it"),
]


def stage_of(relpath: str) -> str:
    """'tunelab/train/loop.py' -> 'train'; 'tunelab/config.py' -> 'config'; the package's own files -> ''."""
    parts = Path(relpath).with_suffix("").parts[1:]
    return "" if not parts or parts[0] in ("__init__", "__main__") else parts[0]


def imported_stages(relpath: str, source: str) -> list[tuple[int, str, str]]:
    """(line, module, stage) of every tunelab import in a file, those inside functions (lazy ones) included."""
    package = list(Path(relpath).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "").split(".") if node.level == 0 else package[: len(package) - node.level + 1] + (
                node.module.split(".") if node.module else [])
            module = ".".join(p for p in base if p)
            # `from tunelab import cli` imports the submodule cli
            names = [f"{module}.{a.name}" for a in node.names] if module == "tunelab" else [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tunelab" and len(parts) > 1 and parts[1] in STAGES:
                found.append((node.lineno, name, parts[1]))
    return found


def import_violations(files: dict[str, str]) -> list[str]:
    """Every import that breaks a rule, as 'file:line imports module: why'. files: path under src/ -> source."""
    out = []
    for relpath, source in sorted(files.items()):
        stage = stage_of(relpath)
        for line, module, target in imported_stages(relpath, source):
            if target == stage:
                continue
            for applies_to, forbidden, why in RULES:
                if stage in applies_to and target in forbidden:
                    out.append(f"{relpath}:{line} imports {module}: {why}")
                    break
    return out


def stage_cycles(files: dict[str, str]) -> list[list[str]]:
    """Cycles in the graph of which stage imports which (no stage may, through others, import itself)."""
    graph: dict[str, set[str]] = {}
    for relpath, source in files.items():
        stage = stage_of(relpath)
        if stage:
            graph.setdefault(stage, set()).update(t for _, _, t in imported_stages(relpath, source) if t != stage)
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for stage in sorted(graph):
        visit(stage, [])
    return cycles


def package_files() -> dict[str, str]:
    return {p.relative_to(SRC).as_posix(): p.read_text(encoding="utf-8") for p in (SRC / "tunelab").rglob("*.py")}


# ------------------------------------------------------------------ imports


def test_imports_point_down():
    violations = import_violations(package_files())
    assert not violations, "imports that break the layering rules:\n" + "\n".join(violations)


def test_a_planted_import_breaks_a_rule_and_is_named():
    planted = {
        "tunelab/train/shortcut.py": "from tunelab.experiments.sweep import run_sweep\n",
        "tunelab/serve/app.py": "def handler():\n    from tunelab.train.loop import FineTune  # lazy, still counted\n",
        "tunelab/runtime/oops.py": "import tunelab.config\n",
        "tunelab/monitor/drift.py": "from ..serve import app\n",  # relative imports resolve too
        "tunelab/report/fine.py": "from tunelab.results import Plan\nfrom tunelab.runtime.run_dir import RunDir\n",
    }
    assert import_violations(planted) == [
        "tunelab/monitor/drift.py:1 imports tunelab.serve: monitoring reads the logs serve writes instead of "
        "importing it",
        "tunelab/runtime/oops.py:1 imports tunelab.config: the floor imports nothing above it",
        "tunelab/serve/app.py:2 imports tunelab.train.loop: a server loads finished runs (inference, adapters, "
        "models); it never trains",
        "tunelab/train/shortcut.py:1 imports tunelab.experiments.sweep: training writes a run directory; what "
        "reads it comes after",
    ]


def test_no_import_cycles_between_stages():
    assert stage_cycles(package_files()) == []
    # the cycle this layout removed: the loop imported plan, and plan imported train's hardware module
    planted = {"tunelab/train/loop.py": "from tunelab.plan import estimate\n",
               "tunelab/plan/estimate.py": "from tunelab.train.hardware import resolve_precision\n"}
    assert stage_cycles(planted) == [["plan", "train", "plan"]]


def test_import_tunelab_and_the_command_line_stay_light():
    """Heavy and optional libraries load only when a command needs them: `tunelab --help`, a config check or
    a bad data line answer in well under a second, and serve/track's extras are never required to train."""
    heavy = ["torch", "transformers", "peft", "matplotlib", "optuna", "fastapi", "uvicorn", "mlflow", "onnxruntime"]
    code = ("import sys, tunelab, tunelab.cli, tunelab.config, tunelab.results, tunelab.runtime.run_dir\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the run directory


RUN_DIR_FILES = {"config.yaml", "manifest.json", "metrics.json", "metrics.jsonl", "labels.json", "eval_untuned.json",
                 "head.safetensors", "checkpoints", "report.md", "report.html", "trace.json", "ops.txt"}
RUN_DIR_FOLDERS = {"model", "backbone", "tokenizer", "plots"}  # caught when joined into a path with /
OWNER = "tunelab/runtime/run_dir.py"
# Same names, other folders: the bundled MiniLM package ships its weights in model/; a comparison has plots/.
NOT_A_RUN_DIR = {("tunelab/models/registry.py", "model"), ("tunelab/report/compare_report.py", "plots")}


def stray_run_dir_paths(files: dict[str, str]) -> list[str]:
    """Run-directory names spelled outside RunDir: string constants (docstrings aside) naming its files, and
    its folders joined with `/`."""
    out = []
    for relpath, source in sorted(files.items()):
        if relpath == OWNER:
            continue
        tree = ast.parse(source)
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in RUN_DIR_FILES and id(node) not in docstrings:
                found.append(node)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                    and node.right.value in RUN_DIR_FOLDERS and (relpath, node.right.value) not in NOT_A_RUN_DIR:
                found.append(node.right)
        found.sort(key=lambda n: (n.lineno, n.col_offset))
        out += [f"{relpath}:{n.lineno} spells {n.value!r}" for n in found]
    return out


def test_only_run_dir_spells_run_directory_paths():
    stray = stray_run_dir_paths(package_files())
    assert not stray, "ask RunDir (runtime/run_dir.py) for these paths:\n" + "\n".join(stray)


def test_a_planted_run_dir_path_is_caught():
    planted = {"tunelab/serve/load.py": 'import json\n\ndef labels(run):\n    """Reads labels.json."""\n'
                                        '    return json.loads((run / "labels.json").read_text())\n\n'
                                        'def head(run):\n    return run / "model" / "head.safetensors"\n'}
    assert stray_run_dir_paths(planted) == [
        "tunelab/serve/load.py:5 spells 'labels.json'",
        "tunelab/serve/load.py:8 spells 'model'",
        "tunelab/serve/load.py:8 spells 'head.safetensors'",
    ]


# ------------------------------------------------------------------ file size


def test_no_file_over_600_lines():
    long = {path: source.count("\n") for path, source in package_files().items() if source.count("\n") > 600}
    assert not long, f"split by responsibility: {long}"
