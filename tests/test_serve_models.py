"""Many runs on one copy of the base: every technique shares the base's weight tensors, and a run served on
the shared base computes exactly what the same run loaded on its own computes."""

import pytest
import torch

from tunelab.inference.trained import TrainedModel
from tunelab.serve.registry import ModelRegistry, share_weights

ADAPTERS = ["lora", "dora", "ia3", "prompt", "prefix", "adapter"]


@pytest.fixture(scope="module")
def registry(serve_runs, tmp_path_factory):
    reg = ModelRegistry(tmp_path_factory.mktemp("served") / "served.json")
    for name, path in serve_runs.items():
        reg.load(name, path)
    return reg


def _base_pointers(reg: ModelRegistry, name: str) -> set[int]:
    served = reg.get(name)
    base = reg._pool._bases[served.base_key][0]
    return {p.data_ptr() for p in base.parameters()}


@pytest.mark.parametrize("technique", ADAPTERS + ["qlora"])
def test_every_technique_runs_on_the_one_copy_of_its_base(registry, technique):
    base = _base_pointers(registry, f"chat-{technique}")
    served = set(registry.get(f"chat-{technique}").weight_pointers().values())
    assert base and base <= served, "a base weight was copied instead of shared"


def test_base_is_loaded_once_per_distinct_base(registry):
    # decoder (fp32, shared by 6 chat techniques and the plain-text run), decoder in 4-bit (QLoRA), encoder
    assert registry.bases_loaded == 3
    lora, prompt, text = (registry.get(n).base_key for n in ("chat-lora", "chat-prompt", "text-lora"))
    assert lora == prompt == text != registry.get("chat-qlora").base_key
    assert registry.get("sentiment-lora").base_key == registry.get("sentiment-ia3").base_key


def test_full_fine_tuning_owns_its_weights(registry):
    # Negative control for the pointer test: a fully fine-tuned run shares nothing with the base.
    full = set(registry.get("chat-full").weight_pointers().values())
    assert not full & _base_pointers(registry, "chat-lora")


@pytest.mark.parametrize("name", [f"chat-{t}" for t in ADAPTERS + ["full"]] + ["sentiment-lora", "sentiment-ia3"])
def test_shared_base_computes_what_the_run_alone_computes(registry, serve_runs, name):
    served = registry.get(name).trained
    alone = TrainedModel(serve_runs[name])
    ids = served.tokenizer(["Repeat the word apple.", "a wonderful film"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits_served = served.model(ids["input_ids"], ids["attention_mask"]).logits
        logits_alone = alone.model(ids["input_ids"], ids["attention_mask"]).logits
        assert torch.allclose(logits_served, logits_alone, atol=1e-6, rtol=0)
        if served.cfg.method.name != "full" and served.task != "classification":
            # ...and the adapter is really applied: the bare base gives other logits.
            base = registry._pool._bases[registry.get(name).base_key][0]
            logits_base = base(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
            length = logits_base.size(1)  # prompt tuning puts its virtual tokens first
            assert (logits_served[:, -length:] - logits_base).abs().max() > 1e-5


def test_share_weights_copies_modules_not_tensors(tiny_encoder):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_encoder)
    clone = share_weights(base)
    assert clone is not base and clone.encoder is not base.encoder
    assert [p.data_ptr() for p in clone.parameters()] == [p.data_ptr() for p in base.parameters()]


def test_unload_frees_a_base_only_when_its_last_run_goes(serve_runs, tmp_path):
    reg = ModelRegistry(tmp_path / "served.json")
    reg.load("a", serve_runs["sentiment-lora"])
    reg.load("b", serve_runs["sentiment-ia3"])
    assert reg.bases_loaded == 1
    reg.unload("a")
    assert reg.bases_loaded == 1 and reg.get("b") is not None
    reg.load("b", serve_runs["sentiment-lora"])  # a reload on the same base keeps it
    assert reg.bases_loaded == 1 and reg.get("b").version == 2
    reg.unload("b")
    assert reg.bases_loaded == 0


def test_served_json_records_what_was_loaded_from_where(registry, serve_runs):
    import json

    doc = json.loads(registry.served_json.read_text())
    assert doc["schema"] == 1
    entry = next(m for m in doc["loaded"] if m["name"] == "chat-lora")
    assert entry["source"] == str(serve_runs["chat-lora"].resolve()) and entry["source_type"] == "run"
    assert entry["method"] == "lora" and entry["task"] == "instruction" and entry["run_status"] == "completed"
    assert any(k.endswith("adapter_model.safetensors") and len(v) == 64 for k, v in entry["weights_sha256"].items())


def test_a_broken_export_folder_is_refused_in_one_line(tmp_path):
    """Merged and adapter exports are served (tests/test_export.py); an export.json this tunelab cannot read is not."""
    from tunelab.errors import TunelabError

    (tmp_path / "export.json").write_text("{}")
    with pytest.raises(TunelabError, match=r"export.json: schema None; this tunelab reads schema 1"):
        ModelRegistry().load("x", tmp_path)

