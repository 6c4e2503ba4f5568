"""Routing: pick the right adapter for each input, then let that adapter answer.

The router adds the log-probabilities of two small classifiers over two views of the text:

- a multinomial logistic regression over a sentence embedding: the bundled MiniLM encoder, untuned,
  mean-pooled over real tokens and L2-normalised (how all-MiniLM-L6-v2 was trained to be used). It sees what a
  text is about: reviews, news, questions;
- a multinomial naive Bayes over hashed character 2-5-grams within words (case kept). It sees how a text is
  written: a short text message and a short review can mean alike and still be written very differently ("u",
  "2day", "da", prices, lower-cased tokenised prose), which a sentence embedding mostly averages away.

Both are scikit-learn's (LogisticRegression, MultinomialNB, HashingVectorizer); the router stores only their
arrays, in safetensors. On the four bundled tasks the embedding alone routed 95-96% of the test inputs, the
n-grams alone about 98.6%, and the two together the figure docs/12 gives. Both train in seconds to a minute.
Folders written before the n-grams (no "char_ngrams" in recipe.json) still load and route on embeddings alone.

An explicit task tag (`--task NAME`) bypasses the router: the caller knows the task, which is the oracle the
router is measured against.

Saved: router.safetensors (weight and bias of the embedding classifier; ngram_log_prob and ngram_log_prior of
the n-gram one) and recipe.json (encoder, n-gram settings, the tasks in output order, their runs).
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

from tunelab.adapters.sources import Source, output_folder, read_sources
from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_dir, atomic_write_json
from tunelab.runtime.run_dir import RunDir

ENCODER = "minilm-l6"
MAX_LENGTH = 128  # enough for a sentence or two: the task shows in the first words
# 2**18 hashed buckets keep collisions rare for 20,000 texts' n-grams; the router file is then 4 MB per 4 tasks.
CHAR_NGRAMS = {"analyzer": "char_wb", "ngram_range": [2, 5], "n_features": 2 ** 18, "lowercase": False,
               "alpha": 0.1}
C = 10.0  # inverse L2 strength of the embedding classifier (unit-norm inputs, so weights must grow)
# How much the embedding's log-probabilities count beside the n-grams': the candidate that routes a held-out
# tenth of the training inputs best is kept (never the test inputs), then both classifiers are refit on all.
EMBEDDING_WEIGHTS = (0.5, 1.0, 2.0, 3.0, 5.0)


def embed(texts: list[str], encoder: str = ENCODER, batch_size: int = 64, log=None):
    """Mean-pooled, L2-normalised embeddings (n x hidden) with a freshly loaded encoder. Anything that embeds
    more than once (a Router, a server) holds an Encoder instead, so the model is read from disk once."""
    return Encoder(encoder)(texts, batch_size)


class Encoder:
    """The router's sentence embedder, loaded once: tokenizer and model, in fp32, in eval mode."""

    def __init__(self, name: str = ENCODER):
        import torch
        from transformers import AutoModel

        from tunelab.config import ModelConfig
        from tunelab.models.loading import load_hf_config, load_tokenizer

        model_cfg = ModelConfig(name=name)
        source, _ = load_hf_config(model_cfg)
        self.name = name
        self.tokenizer = load_tokenizer(source, model_cfg)
        self.model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()

    def __call__(self, texts: list[str], batch_size: int = 64):
        """Embeddings computed shortest texts first, to pad little."""
        import torch

        from tunelab.runtime.hardware import usable_cores

        torch.set_num_threads(usable_cores())
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1)
        return out


def char_ngrams(texts: list[str], settings: dict):
    """Hashed character n-gram counts (a scipy sparse matrix, n x n_features)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer=settings["analyzer"], ngram_range=tuple(settings["ngram_range"]),
                             n_features=settings["n_features"], lowercase=settings["lowercase"],
                             alternate_sign=False, norm=None).transform(texts)


def fit_logistic(x, y: list[int], c: float = C):
    """Multinomial logistic regression (L-BFGS, deterministic): weight (k x d) and bias (k), as float32 arrays.
    With two tasks scikit-learn fits one row; the softmax of (-z/2, z/2) gives the same probabilities."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(x, y)  # equal task priors
    weight, bias = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
    if weight.shape[0] == 1:
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    # scikit-learn's coef_ can be Fortran-ordered, and safetensors.numpy writes an array's memory as it lies:
    # a Fortran-ordered array would come back transposed-and-reshaped, a router that routes at random.
    return np.ascontiguousarray(weight), np.ascontiguousarray(bias)


def fit_naive_bayes(counts, y: list[int], alpha: float):
    """Multinomial naive Bayes with equal task priors: per-task n-gram log-probabilities and log-priors."""
    import numpy as np
    from sklearn.naive_bayes import MultinomialNB

    model = MultinomialNB(alpha=alpha, fit_prior=False).fit(counts, y)
    return (np.ascontiguousarray(model.feature_log_prob_, dtype=np.float32),
            np.ascontiguousarray(model.class_log_prior_, dtype=np.float32))


def combine(embedding_logits, ngram_logits, embedding_weight: float):
    """The router's log-scores: weighted embedding log-probabilities plus the n-grams' log-probabilities."""
    return embedding_weight * _log_softmax(embedding_logits) + _log_softmax(ngram_logits)


def choose_embedding_weight(x, counts, targets: list[int], seed: int = 0) -> tuple[float, dict]:
    """Fit both classifiers on nine tenths of the training inputs and keep the embedding weight that routes the
    other tenth best (ties: the smaller weight). Returns the weight and the held-out accuracy of each."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(targets))
    cut = len(order) // 10
    val, fit = order[:cut], order[cut:]
    y = np.asarray(targets)
    if cut == 0 or len(set(y[fit].tolist())) < len(set(targets)):
        return EMBEDDING_WEIGHTS[0], {}
    weight, bias = fit_logistic(x[fit], y[fit].tolist())
    log_prob, log_prior = fit_naive_bayes(counts[fit], y[fit].tolist(), CHAR_NGRAMS["alpha"])
    emb, ngram = x[val] @ weight.T + bias, np.asarray(counts[val] @ log_prob.T) + log_prior
    scores = {w: float((combine(emb, ngram, w).argmax(-1) == y[val]).mean()) for w in EMBEDDING_WEIGHTS}
    best = max(scores.values())
    return next(w for w in EMBEDDING_WEIGHTS if scores[w] == best), scores


def _log_softmax(z):
    import numpy as np

    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _texts(path: str, source: Source) -> list[dict]:
    from tunelab.data.examples import load_examples

    return load_examples(path, source.cfg.task, source.cfg.data.columns)


def build_router(run_dirs: list[Path], output: Path, per_task: int = 5000, encoder: str = ENCODER,
                 evaluate: bool = True, log=None) -> RunDir:
    """Train the router on up to `per_task` training inputs of each task (seeded sample, the same number per
    task so no task wins by size), measure it on every task's test inputs, and write the folder."""
    import numpy as np
    from safetensors.numpy import save_file

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
    embedder = Encoder(encoder)  # read once: the evaluation below routes with it too
    x = np.asarray(embedder(texts), dtype=np.float32)
    counts = char_ngrams(texts, CHAR_NGRAMS)
    weight_of_embedding, validation = choose_embedding_weight(x, counts, targets)
    say(f"route  embedding weight {weight_of_embedding:g} (held-out routing accuracy by weight: "
        + ", ".join(f"{w:g}: {a:.4f}" for w, a in validation.items()) + ")")
    recipe = {"kind": "router", "encoder": encoder, "max_length": MAX_LENGTH, "char_ngrams": CHAR_NGRAMS,
              "embedding_classifier": {"kind": "logistic regression", "C": C},
              "embedding_weight": weight_of_embedding, "per_task": per_task,
              "tasks": [{"task": s.name, "run_dir": str(s.path), "labels": s.labels} for s in sources]}
    weight, bias = fit_logistic(x, targets)
    ngram_log_prob, ngram_log_prior = fit_naive_bayes(counts, targets, CHAR_NGRAMS["alpha"])
    output = output_folder(output, "router")
    with atomic_dir(output) as tmp:
        folder = RunDir(tmp)
        save_file({"weight": weight, "bias": bias, "ngram_log_prob": ngram_log_prob,
                   "ngram_log_prior": ngram_log_prior}, str(folder.router_weights))
        atomic_write_json(folder.recipe_path, recipe)
        router_info = {"kind": _describe(recipe), "encoder": encoder, "held_out_accuracy_by_weight": validation,
                           "train_inputs": len(texts)}
        if evaluate:
            router = Router(tmp, sources=sources, encoder=embedder)
            metrics = evaluate_router(router, sources, say)
            atomic_write_json(folder.metrics_path, {"router": router_info, **metrics})
    return RunDir(output)


class Router:
    """A router folder, loaded: route(texts) -> task names, predict(texts) -> the chosen adapter's answers."""

    def __init__(self, folder: str | Path, sources: list[Source] | None = None, encoder: Encoder | None = None):
        from safetensors.numpy import load_file

        run = RunDir(folder)
        if not run.is_router():
            raise TunelabError(f"{folder}: not a router folder (no router.safetensors and recipe.json)")
        self.folder = Path(folder)
        self.recipe = run.recipe()
        self.tasks = [t["task"] for t in self.recipe["tasks"]]
        self.tensors = load_file(str(run.router_weights))
        self._sources = {s.name: s for s in sources} if sources else None
        self._models: dict[str, object] = {}
        self._encoder = encoder
        self._encoder_lock = threading.Lock()  # a server's threads must not load it twice

    def encoder(self) -> Encoder:
        """The embedder, loaded on first use and kept: every later route() reuses it."""
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = Encoder(self.recipe["encoder"])
            return self._encoder

    def embed(self, texts: list[str]):
        return self.encoder()(texts)

    def run_dir(self, task: str) -> Path:
        if self._sources is not None:
            return self._sources[task].path
        path = Path(next(t["run_dir"] for t in self.recipe["tasks"] if t["task"] == task))
        if not path.is_dir():
            raise TunelabError(f"{self.folder}: router task '{task}': its run {path} is not here (run directories "
                               "are named as given to route build, relative to where it ran)")
        return path

    def scores(self, texts: list[str], embeddings=None):
        """Each text's probability for each task (n x tasks, numpy)."""
        import numpy as np

        if embeddings is None:
            embeddings = self.embed(texts)
        t = self.tensors
        logits = np.asarray(embeddings, dtype=np.float32) @ t["weight"].T + t["bias"]
        if self.recipe.get("char_ngrams"):
            ngram = np.asarray(char_ngrams(texts, self.recipe["char_ngrams"]) @ t["ngram_log_prob"].T)
            logits = combine(logits, ngram + t["ngram_log_prior"], self.recipe["embedding_weight"])
        return np.exp(_log_softmax(logits))

    def route(self, texts: list[str], embeddings=None) -> list[tuple[str, float]]:
        probs = self.scores(texts, embeddings)
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


def _describe(recipe: dict) -> str:
    if not recipe.get("char_ngrams"):
        return f"logistic regression on {recipe['encoder']} embeddings"
    return (f"logistic regression on {recipe['encoder']} embeddings (x{recipe['embedding_weight']:g}) + naive Bayes "
            "on character 2-5-grams, log-probabilities added")
