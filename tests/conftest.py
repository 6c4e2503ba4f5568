"""Shared fixtures: tiny random-init models built from a config, small data files, config builders.

Tiny models reuse the bundled tokenizers (so text really tokenizes) with 2 layers and width 32-64, so a
whole training run takes a second or two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tunelab.models.registry import minilm_dir

    out = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, architectures=["BertModel"],
    )
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> str:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template (pad id == EOS id, like SmolLM2)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.registry import smollm2_dir

    out = tmp_path_factory.mktemp("tiny-decoder")
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def sentiment_files(tmp_path) -> tuple[Path, Path]:
    """A small balanced slice of SST-2 (real data) as train/test JSONL."""
    rows = [json.loads(line) for line in (DATA / "sst2" / "train.jsonl").read_text().splitlines()[:400]]
    return write_jsonl(tmp_path / "train.jsonl", rows[:320]), write_jsonl(tmp_path / "test.jsonl", rows[320:])


def make_config(**sections) -> dict:
    """A raw config dict with test-friendly defaults; keyword sections are merged over them."""
    raw = {
        "task": "classification",
        "model": {"name": "minilm-l6"},
        "data": {"train": "train.jsonl", "max_length": 64},
        "method": {"name": "full"},
        "train": {"batch_size": 8, "precision": "fp32", "log_every": 1, "seed": 0},
        "eval": {"batch_size": 32},
        # Off in unit tests: each run would open a fresh MLflow store; the tracking tests turn it on.
        "track": {"enabled": False},
        "output": {"dir": "runs"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@pytest.fixture(scope="session")
def tiny_chatty_decoder(tmp_path_factory) -> str:
    """tiny_decoder with weights drawn 15x wider (std 0.3): its greedy text then depends on the prompt (at
    std 0.02 every prompt gives the same newlines), so tests can tell two prompts or templates apart."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.registry import smollm2_dir

    out = tmp_path_factory.mktemp("tiny-chatty-decoder")
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory, tiny_encoder, tiny_chatty_decoder) -> dict[str, Path]:
    """Tiny trained runs for the serving tests: every technique on one decoder base (instruction tuning),
    a plain-text run, and two classifiers on one encoder base. Name -> run directory."""
    from serve_helpers import instruction_files, train_run

    folder = tmp_path_factory.mktemp("serve-runs")
    itrain, itest = instruction_files(folder)
    rows = [json.loads(line) for line in (DATA / "sst2" / "train.jsonl").read_text().splitlines()[:64]]
    ctrain, ctest = write_jsonl(folder / "c-train.jsonl", rows[:48]), write_jsonl(folder / "c-test.jsonl", rows[48:])
    ltrain = write_jsonl(folder / "lm-train.jsonl", [{"text": r["text"]} for r in rows[:48]])
    ltest = write_jsonl(folder / "lm-test.jsonl", [{"text": r["text"]} for r in rows[48:]])
    methods = {
        "lora": {"name": "lora", "rank": 4}, "dora": {"name": "dora", "rank": 4}, "qlora": {"name": "qlora", "rank": 4},
        "ia3": {"name": "ia3"}, "prompt": {"name": "prompt", "num_virtual_tokens": 4},
        "prefix": {"name": "prefix", "num_virtual_tokens": 4}, "adapter": {"name": "adapter", "reduction_factor": 4},
        "full": {"name": "full"},
    }
    runs = {f"chat-{k}": train_run(folder, f"chat-{k}", tiny_chatty_decoder, "instruction", m, itrain, itest)
            for k, m in methods.items()}
    runs["text-lora"] = train_run(folder, "text-lora", tiny_chatty_decoder, "causal_lm", methods["lora"], ltrain,
                                  ltest)
    for k in ("lora", "ia3"):
        runs[f"sentiment-{k}"] = train_run(folder, f"sentiment-{k}", tiny_encoder, "classification", methods[k],
                                           ctrain, ctest)
    return runs
