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
    routed = router.predict(["what is the tallest mountain in africa ?", "a warm , funny and moving film ."])
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
