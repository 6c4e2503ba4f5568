"""Routing: pick the right adapter for each input, then let that adapter answer.

The router is a multinomial logistic regression over sentence embeddings: the bundled MiniLM encoder, untuned,
mean-pooled over real tokens and L2-normalised (how all-MiniLM-L6-v2 was trained to be used). Tasks whose
inputs look different (movie reviews, news, questions, text messages) sit in different regions of that space,
so a linear layer separates them; it trains in seconds on a few thousand inputs per task.

An explicit task tag (`--task NAME`) bypasses the router: the caller knows the task, which is the oracle the
router is measured against.

Saved: router.safetensors (weight, bias) and recipe.json (encoder, the tasks in output order, their runs).
"""

from __future__ import annotations

import random
from pathlib import Path

from tunelab.adapters.sources import Source, output_folder, read_sources
from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_dir, atomic_write_json
from tunelab.runtime.run_dir import RunDir

ENCODER = "minilm-l6"
MAX_LENGTH = 128  # enough for a sentence or two: the task shows in the first words


def embed(texts: list[str], encoder: str = ENCODER, batch_size: int = 64, log=None):
    """Mean-pooled, L2-normalised embeddings (n x hidden), computed shortest texts first to pad little."""
    import torch
    from transformers import AutoModel

    from tunelab.config import ModelConfig
    from tunelab.models.loading import load_hf_config, load_tokenizer
    from tunelab.runtime.hardware import usable_cores

    torch.set_num_threads(usable_cores())
    model_cfg = ModelConfig(name=encoder)
    source, _ = load_hf_config(model_cfg)
    tokenizer = load_tokenizer(source, model_cfg)
    model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


def fit_logistic(x, y, num_classes: int, weight_decay: float = 1e-4, steps: int = 200):
    """Multinomial logistic regression by full-batch L-BFGS: (weight k x d, bias k). Deterministic."""
    import torch

    torch.manual_seed(0)
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    scale = 10.0  # unit-norm inputs: a fixed temperature lets small weights reach confident scores

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scale * x @ weight.T + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (scale * weight).detach(), bias.detach()


def _texts(path: str, source: Source) -> list[dict]:
    from tunelab.data.examples import load_examples

    return load_examples(path, source.cfg.task, source.cfg.data.columns)


def build_router(run_dirs: list[Path], output: Path, per_task: int = 2000, encoder: str = ENCODER,
                 evaluate: bool = True, log=None) -> RunDir:
    """Train the router on up to `per_task` training inputs of each task (seeded sample, the same number per
    task so no task wins by size), measure it on every task's test inputs, and write the folder."""
    import torch
    from safetensors.torch import save_file

    from tunelab.adapters.route_eval import evaluate_router

    say = log.print if log is not None else (lambda *a, **k: None)
    sources = read_sources(run_dirs)
    if len(sources) < 2:
        raise TunelabError("a router needs at least two runs to choose between")
    for s in sources:
        if s.cfg.task != "classification":
            raise TunelabError(f"{s.path}: route build routes between classification runs; this run is {s.cfg.task}")
    texts, targets = [], []
    rng = random.Random(0)
    for k, s in enumerate(sources):
        rows = [ex["text"] for ex in _texts(s.train_file, s)]
        rng.shuffle(rows)
        rows = rows[:per_task]
        texts += rows
        targets += [k] * len(rows)
    say(f"route  embedding {len(texts)} training inputs of {len(sources)} tasks with {encoder}")
    x = embed(texts, encoder)
    weight, bias = fit_logistic(x, torch.tensor(targets), len(sources))
    recipe = {"kind": "router", "encoder": encoder, "max_length": MAX_LENGTH, "per_task": per_task,
              "tasks": [{"task": s.name, "run_dir": str(s.path), "labels": s.labels} for s in sources]}
    output = output_folder(output, "router")
    with atomic_dir(output) as tmp:
        folder = RunDir(tmp)
        save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(folder.router_weights))
        atomic_write_json(folder.recipe_path, recipe)
        router_info = {"kind": "logistic regression", "encoder": encoder, "train_inputs": len(texts)}
        if evaluate:
            router = Router(tmp, sources=sources)
            metrics = evaluate_router(router, sources, say)
            atomic_write_json(folder.metrics_path, {"router": router_info, **metrics})
    return RunDir(output)


class Router:
    """A router folder, loaded: route(texts) -> task names, predict(texts) -> the chosen adapter's answers."""

    def __init__(self, folder: str | Path, sources: list[Source] | None = None):
        from safetensors.torch import load_file

        run = RunDir(folder)
        if not run.is_router():
            raise TunelabError(f"{folder}: not a router folder (no router.safetensors and recipe.json)")
        self.recipe = run.recipe()
        self.tasks = [t["task"] for t in self.recipe["tasks"]]
        tensors = load_file(str(run.router_weights))
        self.weight, self.bias = tensors["weight"], tensors["bias"]
        self._sources = {s.name: s for s in sources} if sources else None
        self._models: dict[str, object] = {}

    def run_dir(self, task: str) -> Path:
        if self._sources is not None:
            return self._sources[task].path
        path = Path(next(t["run_dir"] for t in self.recipe["tasks"] if t["task"] == task))
        if not path.is_dir():
            raise TunelabError(f"router task '{task}': its run {path} is not here (run directories are named as "
                               "given to route build, relative to where it ran)")
        return path

    def scores(self, embeddings):
        return (embeddings @ self.weight.T + self.bias).softmax(-1)

    def route(self, texts: list[str], embeddings=None) -> list[tuple[str, float]]:
        if embeddings is None:
            embeddings = embed(texts, self.recipe["encoder"])
        probs = self.scores(embeddings)
        best = probs.argmax(-1).tolist()
        return [(self.tasks[k], float(probs[i, k])) for i, k in enumerate(best)]

    def model(self, task: str):
        from tunelab.inference.trained import TrainedModel

        if task not in self._models:
            self._models[task] = TrainedModel(self.run_dir(task))
        return self._models[task]

    def predict(self, texts: list[str], task: str | None = None) -> list[dict]:
        """Each text's adapter (the router's choice, or `task` when given) and that adapter's prediction."""
        if task is not None and task not in self.tasks:
            raise TunelabError(f"--task '{task}' is not one of this router's tasks: {', '.join(self.tasks)}")
        routes = [(task, 1.0)] * len(texts) if task else self.route(texts)
        out: list[dict | None] = [None] * len(texts)
        for name in dict.fromkeys(t for t, _ in routes):
            idx = [i for i, (t, _) in enumerate(routes) if t == name]
            for i, pred in zip(idx, self.model(name).predict([texts[i] for i in idx])):
                out[i] = {"text": texts[i], "adapter": name, "routed_by": "tag" if task else "router",
                          "route_score": routes[i][1], **{k: v for k, v in pred.items() if k != "text"}}
        return out
