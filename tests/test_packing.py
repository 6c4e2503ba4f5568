"""Packing changes no example's loss, and the chunked LM loss equals the full-logits loss, on a tiny decoder."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from tunelab.config import validate_config
from tunelab.data import packing
from tunelab.data.batching import collate
from tunelab.data.tokenize import tokenize_causal_lm, tokenize_instruction
from tunelab.models import task_models
from tunelab.models.task_models import IGNORE_INDEX, CausalLM
from tunelab.train.run import run_training

from conftest import make_config, write_jsonl

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def decoder(tiny_decoder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    torch.manual_seed(0)
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_decoder, dtype=torch.float32)  # noqa: E731
    return load, tokenizer


@pytest.fixture(scope="module")
def features(decoder):
    """Instruction examples (loss on the response only) and plain text (loss everywhere), of varied lengths."""
    _, tokenizer = decoder
    words = "the river runs past a stone bridge where clouds gather before the rain".split()
    rng = random.Random(0)
    instructions = [
        {"instruction": " ".join(rng.choices(words, k=rng.randint(2, 12))), "input": "",
         "output": " ".join(rng.choices(words, k=rng.randint(1, 15)))}
        for _ in range(6)
    ]
    texts = [{"text": " ".join(rng.choices(words, k=rng.randint(1, 30)))} for _ in range(6)]
    inst, _ = tokenize_instruction(instructions, tokenizer, MAX_LENGTH, "alpaca")
    return inst + tokenize_causal_lm(texts, tokenizer, MAX_LENGTH)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- packing itself


def test_rows_fit_and_hold_every_example_once():
    rng = random.Random(1)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = packing.pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == packing.pack_rows(lengths, 64)  # a pure function: a resumed run rebuilds the same rows
    assert len(rows) <= 1.05 * sum(lengths) / 64 + 1  # best-fit decreasing leaves little room unused


def test_packed_rows_restart_positions_and_never_target_across_examples(features):
    rows = packing.pack_rows([len(f["input_ids"]) for f in features], MAX_LENGTH)
    packed = packing.pack_features(features, MAX_LENGTH)
    assert len(packed) < len(features)
    for row, p in zip(rows, packed):
        offset = 0
        for i in row:
            f, n = features[i], len(features[i]["input_ids"])
            assert p["input_ids"][offset : offset + n] == f["input_ids"]
            assert p["position_ids"][offset : offset + n] == list(range(n))
            assert p["labels"][offset] == IGNORE_INDEX and p["labels"][offset + 1 : offset + n] == f["labels"][1:]
            offset += n
        assert offset == len(p["input_ids"]) <= MAX_LENGTH


# ---------------------------------------------------------------- packing changes no example's loss


def _per_example_losses(model, features, packed_batch, rows) -> tuple[list[float], list[float]]:
    """Each example's loss sum alone in an unpacked batch, and inside the packed batch (other labels hidden)."""
    alone, inside = [], []
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            n = len(features[i]["input_ids"])
            alone.append(float(model(**collate([features[i]], pad_id=0)).loss_sum))
            labels = torch.full_like(packed_batch["labels"], IGNORE_INDEX)
            labels[r, offset : offset + n] = packed_batch["labels"][r, offset : offset + n]
            inside.append(float(model(**{**packed_batch, "labels": labels}).loss_sum))
            offset += n
    return alone, inside


@torch.no_grad()
def test_packing_changes_no_example_loss(decoder, features):
    load, tokenizer = decoder
    model = CausalLM(load()).eval()
    rows = packing.pack_rows([len(f["input_ids"]) for f in features], MAX_LENGTH)
    batch = collate(packing.pack_features(features, MAX_LENGTH), tokenizer.pad_token_id)
    alone, inside = _per_example_losses(model, features, batch, rows)
    torch.testing.assert_close(torch.tensor(inside), torch.tensor(alone), atol=1e-5, rtol=1e-6)

    # ... and the check can fail: with a plain causal mask, later examples in a row see earlier ones.
    leaky = {k: v for k, v in batch.items() if k != "position_ids"}
    _, leaked = _per_example_losses(model, features, leaky, rows)
    assert (torch.tensor(leaked) - torch.tensor(alone)).abs().max() > 1e-2


def test_packed_step_has_the_unpacked_gradients(decoder, features):
    load, tokenizer = decoder
    model = CausalLM(load())
    unpacked = collate(features, tokenizer.pad_token_id)
    packed = collate(packing.pack_features(features, MAX_LENGTH), tokenizer.pad_token_id)
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()

    out = model(**unpacked)
    out.loss_sum.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    packed_out = model(**packed)
    packed_out.loss_sum.backward()

    assert packed_out.count == out.count == int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    # What the loop counts as real tokens is unchanged too.
    assert int(packed["attention_mask"].sum()) == int(unpacked["attention_mask"].sum())
    torch.testing.assert_close(packed_out.loss_sum, out.loss_sum, atol=1e-4, rtol=1e-6)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- the chunked loss equals the full-logits loss


# technique -> (PEFT config class, its arguments); "full" trains the bare model, tied embeddings included.
TECHNIQUES = {
    "full": None,
    "lora": ("LoraConfig", {"r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}),
    "lora_on_lm_head": ("LoraConfig", {"r": 4, "lora_dropout": 0.0, "target_modules": ["lm_head", "q_proj"]}),
    "prompt": ("PromptTuningConfig", {"num_virtual_tokens": 5}),  # 5 virtual tokens before the sequence
    "prefix": ("PrefixTuningConfig", {"num_virtual_tokens": 5}),  # 5 cached key/value positions per layer
    "ia3": ("IA3Config", {}),
}


def _apply(backbone, kind: str):
    import peft

    if TECHNIQUES[kind] is None:
        return backbone
    name, kwargs = TECHNIQUES[kind]
    return peft.get_peft_model(backbone, getattr(peft, name)(task_type="CAUSAL_LM", **kwargs))


def _full_logits_loss(backbone, batch) -> tuple[torch.Tensor, int]:
    """The plain loss the chunked one replaces: every position's logits, shifted, cross-entropy."""
    logits = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, logits.size(1) - batch["labels"].size(1) :]  # prompt tuning's virtual tokens
    labels = batch["labels"][:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # LoRA on the tied lm_head: on purpose
@pytest.mark.parametrize(
    "kind, precision",
    [(kind, "fp32") for kind in ("full", "lora", "lora_on_lm_head", "prompt", "prefix", "ia3")]
    + [("full", "bf16"), ("lora", "bf16")],  # autocast: the same loss path, bf16 matmuls
)
def test_chunked_loss_equals_full_logits_loss(decoder, features, monkeypatch, kind, precision):
    load, tokenizer = decoder
    torch.manual_seed(0)
    backbone = _apply(load(), kind)
    if kind != "full":
        with torch.no_grad():  # LoRA's B and IA3's vectors start at identity: move them so the test can fail
            for name, p in backbone.named_parameters():
                if p.requires_grad and ("lora_B" in name or "ia3" in name):
                    p.add_(0.05 * torch.randn_like(p))
    model = CausalLM(backbone)
    batch = collate(features, tokenizer.pad_token_id)
    vocab = backbone.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(task_models, "LOSS_CHUNK_LOGITS", 37 * vocab)  # several chunks, the last one short
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def assert_close(a, b, what):
        if precision == "fp32":
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
        else:  # the reference rounds one whole-batch bf16 matmul, the chunks one each: compare in norm
            assert torch.linalg.vector_norm(a - b) <= 1e-2 * torch.linalg.vector_norm(b), what

    with autocast:
        out = model(**batch)
    out.loss_sum.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    with autocast:
        reference, count = _full_logits_loss(backbone, batch)
    reference.backward()
    expected = _grads(model)

    assert out.count == count and count > 37
    assert_close(out.loss_sum, reference, "loss")
    assert got.keys() == expected.keys() and got
    for name in expected:
        assert_close(got[name], expected[name], f"gradient of {name}")
    with torch.inference_mode(), autocast:  # the evaluation path: no gradients, same loss
        assert_close(model(**batch).loss_sum, reference.detach(), "evaluation loss")


def test_packing_with_prompt_learning_is_refused(decoder, features):
    from tunelab.errors import ConfigError

    load, tokenizer = decoder
    model = CausalLM(_apply(load(), "prompt"))
    with pytest.raises(ConfigError, match="data.packing"):
        model(**collate(packing.pack_features(features, MAX_LENGTH), tokenizer.pad_token_id))


# ---------------------------------------------------------------- through the training loop


def test_packed_run_sees_the_same_loss_and_tokens(tmp_path, monkeypatch, tiny_decoder):
    """One step over every example: the packed run's logged loss and real-token count equal the unpacked run's."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"The number {i} follows {i - 1}" + " and then more" * (i % 5)} for i in range(12)]
    train = write_jsonl(tmp_path / "lm.jsonl", rows)

    def run(packing):
        raw = make_config(
            task="causal_lm", model={"name": tiny_decoder},
            data={"train": str(train), "max_length": 64, "packing": packing},
            train={"batch_size": 12, "max_steps": 1, "lr": 1e-3}, output={"dir": "runs", "name": f"packing-{packing}"},
        )
        run_dir, metrics = run_training(validate_config(raw))
        return json.loads((run_dir.path / "metrics.jsonl").read_text().splitlines()[0]), metrics["train"]

    (plain_step, plain), (packed_step, packed) = run(False), run(True)
    assert packed["real_tokens"] == plain["real_tokens"]
    assert packed_step["loss"] == pytest.approx(plain_step["loss"], abs=1e-5)
