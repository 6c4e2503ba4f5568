"""tunelab route build / predict on tiny adapters, with the real MiniLM encoder as the router's embedder:
reviews and questions are told apart, two copies of one task are not (the negative control), end-to-end
accuracy under the oracle is each adapter's own accuracy, and a task tag bypasses the router."""

from __future__ import annotations

import json

import pytest

from test_merge import lora_run

from tunelab.adapters.router import Router, build_router
from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder):
    folder = tmp_path_factory.mktemp("route-runs")
    return {"reviews": lora_run(folder, "reviews", tiny_encoder, "sst2-test"),
            "questions": lora_run(folder, "questions", tiny_encoder, "trec"),
            "reviews-again": lora_run(folder, "reviews-again", tiny_encoder, "sst2-test", seed=1)}


def test_router_tells_reviews_from_questions_and_measures_end_to_end(runs, tmp_path):
    from tunelab.inference.trained import TrainedModel

    folder = build_router([runs["reviews"], runs["questions"]], tmp_path / "router", per_task=48)
    metrics = json.loads(folder.metrics_path.read_text())
    routing, e2e = metrics["routing"], metrics["end_to_end"]
    assert routing["per_task"]["reviews"]["num_examples"] == 16 and routing["tasks"] == ["reviews", "questions"]
    assert routing["accuracy"] >= 0.9
    assert sum(map(sum, routing["confusion_matrix"])) == 32
    for name in ("reviews", "questions"):
        own = TrainedModel(runs[name]).evaluate_file(str(runs[name].parent / f"{name}-test.jsonl"))["accuracy"]
        assert e2e["per_task"][name]["oracle"] == pytest.approx(own)
        assert e2e["per_task"][name]["routed"] <= e2e["per_task"][name]["oracle"] + 1e-9  # sst2/trec share no labels


def test_two_copies_of_one_task_cannot_be_routed_apart(runs, tmp_path):
    folder = build_router([runs["reviews"], runs["reviews-again"]], tmp_path / "same", per_task=48)
    assert json.loads(folder.metrics_path.read_text())["routing"]["accuracy"] < 0.8  # same inputs: near chance


def test_router_predict_names_the_adapter_and_a_tag_overrides_it(runs, tmp_path):
    from tunelab.cli.run import resolve_source

    folder = build_router([runs["reviews"], runs["questions"]], tmp_path / "r", per_task=48, evaluate=False)
    assert RunDir(folder.path).is_router() and not folder.metrics_path.exists()
    router = Router(folder.path)
    # Written as each data set writes its texts (TREC capitalises; SST-2 is lower-cased): 48 training inputs a
    # task are too few for the n-grams to see past case, which a router trained on thousands does.
    routed = router.predict(["What is the tallest mountain in Africa ?", "a warm , funny and moving film ."])
    assert [r["adapter"] for r in routed] == ["questions", "reviews"]
    assert routed[0]["label"] in RunDir(runs["questions"]).labels() and routed[0]["routed_by"] == "router"
    tagged = router.predict(["what is the tallest mountain in africa ?"], task="reviews")
    assert tagged[0]["adapter"] == "reviews" and tagged[0]["routed_by"] == "tag"
    assert tagged[0]["label"] in RunDir(runs["reviews"]).labels()
    with pytest.raises(TunelabError, match="not one of this router's tasks: reviews, questions"):
        router.predict(["x"], task="spam")
    with pytest.raises(TunelabError, match="is a router"):
        resolve_source(folder.path)


def test_router_refusals_are_one_line(runs, tmp_path):
    with pytest.raises(TunelabError, match="at least two runs"):
        build_router([runs["reviews"]], tmp_path / "one")
    with pytest.raises(TunelabError, match="not a run directory"):
        build_router([runs["reviews"], tmp_path], tmp_path / "bad")
    assert not (tmp_path / "one").exists() and not (tmp_path / "bad").exists()


def test_router_keeps_both_classifiers_and_two_tasks_get_two_score_rows(runs, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    from tunelab.adapters.router import char_ngrams, embed

    folder = build_router([runs["reviews"], runs["questions"]], tmp_path / "r2", per_task=48, evaluate=False)
    recipe = json.loads((folder.path / "recipe.json").read_text())
    assert recipe["char_ngrams"]["analyzer"] == "char_wb" and recipe["char_ngrams"]["ngram_range"] == [2, 5]
    weights = load_file(str(folder.path / "router.safetensors"))
    assert weights["weight"].shape == (2, 384) and weights["bias"].shape == (2,)
    assert weights["ngram_log_prob"].shape == (2, 2 ** 18) and weights["ngram_log_prior"].shape == (2,)
    router = Router(folder.path)
    probes = ["What is the tallest mountain in Africa ?", "a warm , funny film ."]
    probs = router.scores(probes)
    assert np.allclose(probs.sum(-1), 1.0) and probs[0].argmax() == 1 and probs[1].argmax() == 0
    # Each classifier alone, as reloaded from disk, must route the probes too: a weight matrix saved in the
    # wrong memory order reloads as noise that the other classifier would hide.
    t = router.tensors
    by_embedding = np.asarray(embed(probes)) @ t["weight"].T + t["bias"]
    by_ngrams = np.asarray(char_ngrams(probes, recipe["char_ngrams"]) @ t["ngram_log_prob"].T)
    assert by_embedding.argmax(-1).tolist() == [1, 0] and by_ngrams.argmax(-1).tolist() == [1, 0]


def test_a_router_folder_without_ngrams_still_routes_on_embeddings_alone(runs, tmp_path):
    """Folders written before the n-gram features: recipe.json has no char_ngrams, weights are 384 wide."""
    import numpy as np
    from safetensors.numpy import save_file

    from tunelab.adapters.router import embed, fit_logistic

    folder = build_router([runs["reviews"], runs["questions"]], tmp_path / "old", per_task=48, evaluate=False)
    recipe = json.loads((folder.path / "recipe.json").read_text())
    del recipe["char_ngrams"]
    (folder.path / "recipe.json").write_text(json.dumps(recipe))
    texts = ["what is the capital of peru ?", "who wrote hamlet ?", "a dull , lifeless film .", "warm and funny ."]
    weight, bias = fit_logistic(np.asarray(embed(texts)), [1, 1, 0, 0])
    assert weight.shape == (2, 384)
    save_file({"weight": weight, "bias": bias}, str(folder.path / "router.safetensors"))
    assert [t for t, _ in Router(folder.path).route(["where is the eiffel tower ?", "a boring , tired film ."])] \
        == ["questions", "reviews"]


def test_router_arrays_survive_safetensors_for_three_or_more_tasks(tmp_path):
    """scikit-learn's multinomial coef_ is Fortran-ordered; safetensors.numpy writes memory as it lies, so an
    array not made C-contiguous reloads scrambled (a router at chance). Two tasks never showed it."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from tunelab.adapters.router import fit_logistic, fit_naive_bayes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 8)).astype(np.float32)
    y = (np.arange(90) % 3).tolist()
    x[np.arange(90), np.asarray(y)] += 3.0
    weight, bias = fit_logistic(x, y)
    log_prob, log_prior = fit_naive_bayes(np.abs(x), y, 0.1)
    save_file({"weight": weight, "bias": bias, "p": log_prob, "q": log_prior}, str(tmp_path / "r.safetensors"))
    back = load_file(str(tmp_path / "r.safetensors"))
    assert weight.shape == (3, 8) and np.array_equal(back["weight"], weight) and np.array_equal(back["p"], log_prob)
    assert ((x @ back["weight"].T + back["bias"]).argmax(-1) == np.asarray(y)).mean() > 0.9
