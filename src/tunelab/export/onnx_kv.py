"""A decoder's ONNX graph with a KV cache, and greedy decoding with it in onnxruntime.

The graph (one file, model.onnx), with the input and output names optimum-onnx gives its ORTModelForCausalLM:

  inputs   input_ids                  (batch, sequence)         the new tokens
           attention_mask             (batch, total_sequence)   past + new tokens, 1 = real, 0 = padding
           position_ids               (batch, sequence)         positions of the new tokens
           past_key_values.{i}.key    (batch, kv_heads, past_sequence, head_dim), and .value, per layer i
  outputs  logits                     (batch, sequence, vocab)
           present.{i}.key            (batch, kv_heads, total_sequence, head_dim), and .value

Prefill passes past tensors with past_sequence = 0 (onnxruntime takes zero-length dimensions, and the graph
concatenates past and new keys, so an empty past is an ordinary input: no second "no past" graph is needed);
each later step passes one token and the previous call's present.* as past_key_values.*. The whole sequence
with an empty past is the uncached computation, which is how the whole-sequence parity check runs it.

How it is built: a wrapper module takes the flat past tensors, fills a transformers DynamicCache with them,
calls the merged model with use_cache=True and returns the logits and the cache's tensors, flattened. It is
traced by torch's TorchScript exporter (dynamo=False). Tracing records one path through the Python code, so
two choices make that path the general one:
- the causal mask is built here, as a 4D additive mask from attention_mask, and transformers passes a 4D mask
  through untouched: its own mask code picks a path by the cache's length and the query length, which tracing
  would freeze at the example's values;
- the example has 3 new tokens over 2 past ones: a 1-token query would record transformers' decode-only
  shortcut (grouped-query heads packed for q_length == 1), and an empty past a cache with nothing to concat.
Only caches whose every layer is plain full attention (DynamicLayer) are written; sliding-window or linear
attention layers keep other state, and are refused in one line rather than written wrong.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.export.parity import Generate


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key then value for each layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, [name.replace("past_key_values.", "present.") for name in past]


def causal_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, query, total) additive mask: query i (at total - query + i) sees key j when j is at or before
    it and attention_mask[b, j] is 1; what it must not see gets the dtype's most negative value (not -inf, so a
    padding query that sees nothing softmaxes to a uniform row instead of NaN)."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = torch.arange(query_length, device=attention_mask.device) + (total - query_length)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class CachedDecoderGraph(nn.Module):
    """What the ONNX graph computes: (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        mask = causal_mask(attention_mask, input_ids.shape[1], past[0].dtype)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_layout(model: nn.Module, token_ids: list[int]) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's own cache after a short prefill; refuses caches that are not
    plain full attention in every layer."""
    ids = torch.tensor([token_ids[:2]])
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {"DynamicLayer"}:
        raise TunelabError(f"--format onnx: the KV-cache graph is written for full-attention layers only; this "
                           f"model's cache has {', '.join(sorted(kinds))} (use --format merged)")
    _, kv_heads, _, head_dim = cache.layers[0].keys.shape
    return len(cache.layers), int(kv_heads), int(head_dim)


def export_cached_graph(model: nn.Module, path: Path, token_ids: list[int], opset: int) -> dict:
    """Trace the merged decoder into `path`; returns the layout export.json records."""
    token_ids = (list(token_ids) * 5)[:5]  # 2 past + 3 new (see the module docstring)
    num_layers, kv_heads, head_dim = cache_layout(model, token_ids)
    past_names, present_names = cache_names(num_layers)
    batch, past_len, new_len = 2, 2, 3
    ids = torch.tensor([token_ids[past_len:]] * batch)
    mask = torch.ones((batch, past_len + new_len), dtype=torch.long)
    positions = torch.arange(past_len, past_len + new_len).expand(batch, -1)
    torch.manual_seed(0)
    past = [torch.randn(batch, kv_heads, past_len, head_dim) for _ in past_names]
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"}, "logits": {0: "batch", 1: "sequence"},
            **{n: {0: "batch", 2: "past_sequence"} for n in past_names},
            **{n: {0: "batch", 2: "total_sequence"} for n in present_names}}
    inputs, outputs = ["input_ids", "attention_mask", "position_ids", *past_names], ["logits", *present_names]
    graph = CachedDecoderGraph(model, num_layers).eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at every Python branch on a tensor value; those it freezes here are the ones the
        # module docstring chooses (and parity runs the graph at other lengths, so a wrong freeze is refused).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph, (ids, mask, positions, *past), str(path), input_names=inputs,
                          output_names=outputs, dynamic_axes=dims, opset_version=opset, dynamo=False)
    return {"inputs": inputs, "outputs": outputs, "layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim}


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions counted over the real tokens (left padding starts each row at 0, as transformers' generate
    does); padding gets 1, a harmless value its masked-out query never uses."""
    positions = attention_mask.cumsum(-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class OnnxDecoder:
    """model.onnx (the KV-cache graph) in an onnxruntime session: one forward, whole-sequence logits, cached
    logits and greedy decoding. `OnnxDecoder(onnxruntime.InferenceSession("DIR/model.onnx"))`."""

    def __init__(self, session):
        self.session = session
        past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise TunelabError("this model.onnx has no past_key_values inputs (exported without a KV cache)")
        self.past_names, self.present_names = cache_names(len(past) // 2)
        _, self.kv_heads, _, self.head_dim = past[0].shape

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph: (logits, present)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": positions, **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(["logits", *self.present_names], feeds)
        return logits, present

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every position's logits in one pass over the whole sequence (empty past): parity's Logits."""
        mask = attention_mask.numpy()
        logits, _ = self.run(input_ids.numpy(), mask, position_ids(mask), self.empty_past(len(mask)))
        return torch.from_numpy(logits)

    def cached_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefill: int) -> torch.Tensor:
        """The same logits through the cache: the first `prefill` tokens in one pass, then one token per call
        with the previous present as past."""
        ids, mask = input_ids.numpy(), attention_mask.numpy()
        positions = position_ids(mask)
        logits, past = self.run(ids[:, :prefill], mask[:, :prefill], positions[:, :prefill],
                                self.empty_past(len(ids)))
        steps = [logits]
        for t in range(prefill, ids.shape[1]):
            logits, past = self.run(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], past)
            steps.append(logits)
        return torch.from_numpy(np.concatenate(steps, axis=1))

    def generate(self, prompt: list[int], new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt: prefill, then one token per call, feeding present back as past."""
        ids = np.array([prompt], np.int64)
        mask = np.ones_like(ids)
        logits, past = self.run(ids, mask, position_ids(mask), self.empty_past(1))
        out: list[int] = []
        while True:
            out.append(int(logits[0, -1].argmax()))
            if len(out) == new_tokens or out[-1] == eos_token_id:
                return out
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = self.run(np.array([[out[-1]]]), mask, np.array([[mask.shape[1] - 1]]), past)


def torch_cached_greedy(model: nn.Module) -> Generate:
    """Greedy decoding in torch with transformers' own KV cache: what `generate` does, for the speed baseline."""

    @torch.inference_mode()
    def generate(prompt: list[int], new_tokens: int) -> list[int]:
        result = model(input_ids=torch.tensor([prompt]), use_cache=True)
        out: list[int] = []
        while True:
            out.append(int(result.logits[0, -1].argmax()))
            if len(out) == new_tokens:
                return out
            result = model(input_ids=torch.tensor([[out[-1]]]), cache=result.cache, use_cache=True)

    return generate


def seconds_per_token(generate: Generate, prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> float:
    """Median over `repeats` passes of (time to continue every prompt by new_tokens) / tokens generated; the
    prompt's own pass counts, as it does for a user. One untimed prompt first warms the runtime up."""
    generate(prompts[0], 2)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for prompt in prompts:
            generate(prompt, new_tokens)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / (len(prompts) * new_tokens)


def per_token_speed(torch_generate: Generate, fp32: OnnxDecoder, int8: OnnxDecoder | None,
                    prompts: list[list[int]]) -> dict:
    """Seconds per generated token on the parity prompts, each continued GREEDY_TOKENS tokens greedily: torch
    (the merged model, transformers' own KV cache), onnxruntime through the graph's cache, and onnxruntime
    without it (the same graph over the whole sequence at every token, what a graph without a cache costs)."""
    from tunelab.export.parity import GREEDY_TOKENS, greedy

    n = GREEDY_TOKENS
    speed = {"prompts": len(prompts), "new_tokens": n, "repeats": 3,
             "torch": "the merged model in torch with transformers' KV cache (DynamicCache)",
             "torch_cached_s": seconds_per_token(torch_generate, prompts, n),
             "onnx_uncached_s": seconds_per_token(lambda p, k: greedy(fp32.logits, p, k), prompts, n),
             "onnx_cached_s": seconds_per_token(fp32.generate, prompts, n)}
    if int8 is not None:
        speed["onnx_int8_cached_s"] = seconds_per_token(int8.generate, prompts, n)
    speed["onnx_cached_speedup_vs_uncached"] = speed["onnx_uncached_s"] / speed["onnx_cached_s"]
    for key in ("onnx_cached_s", "onnx_int8_cached_s"):
        if key in speed:
            speed[key.replace("_s", "_speedup_vs_torch")] = speed["torch_cached_s"] / speed[key]
    return speed
