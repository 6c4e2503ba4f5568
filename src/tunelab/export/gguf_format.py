"""`--format gguf`: the merged decoder as GGUF files for llama.cpp and Ollama, in F16 and Q8_0.

Written with the `gguf` package (the one llama.cpp's own converter uses): its GGUFWriter, its tensor-name map
(`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`) and its Q8_0 quantizer. Two things the
map does not do, done here as llama.cpp's convert_hf_to_gguf.py does them for Llama:

- q_proj and k_proj rows are permuted: transformers stores each head's rotary dimensions as two halves,
  llama.cpp interleaves them. Forgetting it gives a file that loads and talks nonsense (the round trip below
  catches it: transformers' GGUF reader undoes the permutation, so only a correctly permuted file compares equal).
- the tokenizer goes into the file (tokens, merges, token types, special ids, the chat template), since a GGUF
  file is the whole model for llama.cpp.

Norm weights stay F32 in both files (llama.cpp's convention: they are tiny and sensitive); 2-D weights are
F16, or Q8_0 (blocks of 32 int8 values with one fp16 scale) where the row length allows it.

Only Llama-architecture decoders (SmolLM2, Llama, and others whose config is LlamaConfig) are written; other
architectures need their own tensor layout and are refused in one line rather than written untested.

Verified by loading each file back through transformers' GGUF reader (which dequantizes to fp32) and
comparing logits with the run's model (parity.py); the GGUF tokenizer is checked to encode the held-out
texts to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.export.hf_formats import merged_backbone
from tunelab.export.parity import gate, measure

FILES = {"f16": "model-f16.gguf", "q8_0": "model-q8_0.gguf"}
SUPPORTED = ("llama",)
Q8_BLOCK = 32


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary half-split -> llama.cpp's interleaved layout, per head (as convert_hf_to_gguf)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their GGUF token types, and the BPE merges, from the fast tokenizer's own JSON."""
    import gguf

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise TunelabError(f"--format gguf: the tokenizer is {model.get('type')}, not byte-level BPE; only BPE "
                           "tokenizers are written (SmolLM2, Llama 3)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def write_file(backbone, tokenizer, path: Path, kind: str, name: str) -> None:
    import gguf

    config = backbone.config
    if config.model_type not in SUPPORTED:
        raise TunelabError(f"--format gguf: writes Llama-architecture decoders (SmolLM2, Llama); this model is "
                           f"'{config.model_type}'; use --format merged or onnx")
    scaling = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if scaling not in ("default", None):
        raise TunelabError(f"--format gguf: rope scaling '{scaling}' is not written yet; use --format merged")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, types, merges = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "smollm" in str(getattr(config, "_name_or_path", "")).lower() else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in backbone.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp; a tied output matrix is the token embedding (llama.cpp reuses it)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunelabError(f"--format gguf: no GGUF name for tensor '{hf_name}'; this architecture is not "
                               "written yet")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        if data.ndim == 1:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif kind == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load_back(folder: Path, file: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=file)


def write_gguf(trained, ref_fn, inputs, out: Path, record: dict, say, max_quality_loss: float | None = None) -> dict:
    """Write both files, load each back through transformers and gate its parity; returns the parity reports."""
    if importlib_missing("gguf"):
        raise TunelabError("--format gguf needs the gguf package: pip install 'tunelab[export]'")
    say("merging the technique into the base weights")
    tokenizer = trained.tokenizer
    backbone = merged_backbone(trained)
    name = f"{record['source']['base_model']}-{record['source']['method']}"
    reports = {}
    texts = [tokenizer.decode(f["input_ids"], skip_special_tokens=True) for f in inputs.features]
    for kind, file in FILES.items():
        say(f"writing {file}")
        write_file(backbone, tokenizer, out / file, kind, name)
    del backbone
    for kind, file in FILES.items():
        say(f"loading {file} back through transformers' GGUF reader")
        model, gguf_tokenizer = _load_back(out, file)

        @torch.inference_mode()
        def logits(input_ids, attention_mask, model=model):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

        report = measure(ref_fn, logits, inputs)
        same = sum(gguf_tokenizer(t, add_special_tokens=False)["input_ids"] ==
                   tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
        report["tokenizer_agreement"] = same / max(len(texts), 1)
        reports[f"gguf-{kind}"] = gate(report, f"gguf-{kind}", max_quality_loss)
        del model
    record["notes"]["gguf"] = {
        "files": FILES, "architecture": "llama", "verified_with": "transformers GGUF reader (dequantized to fp32)",
        "ollama_modelfile": f"FROM ./{FILES['q8_0']}",
    }
    return reports


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None
