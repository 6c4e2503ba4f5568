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
