"""Run from the repository root with PYTHONPATH=src: python examples/intermediate/qlora/results/avx2-host/packed_layout_check.py"""
# The packed conversion bitsandbytes would apply on an AVX512-BF16 CPU, run on every 4-bit layer of the real
# bundled models (the conversion is plain torch; only the matmul after it needs AVX512-BF16): does it succeed,
# and does its inverse give back the same bytes?
import torch, collections
from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse
from tunelab.config import validate_config
from tunelab.methods import get_method
from tunelab.models.loading import load_task_model
for name, task in [("minilm-l6", "classification"), ("smollm2-135m", "instruction")]:
    cfg = validate_config({"task": task, "model": {"name": name}, "data": {"train": "x.jsonl"}, "method": {"name": "qlora"}})
    m = get_method("qlora")
    model, _, _ = load_task_model(cfg.model, task, num_labels=2, pretrained_kwargs=m.pretrained_kwargs(cfg.method, "fp32"))
    shapes, ok, bad = collections.Counter(), 0, []
    for mod_name, mod in model.named_modules():
        if type(mod).__name__ != "Linear4bit":
            continue
        w = mod.weight
        qs = w.quant_state
        shapes[tuple(qs.shape)] += 1
        data0 = w.data.clone()
        try:
            packed, qs2 = _convert_weight_packed_for_cpu(w.data.clone(), qs)
            back, qs3 = _convert_weight_packed_for_cpu_inverse(packed, qs2)
            ok += bool(torch.equal(back.view(torch.uint8).reshape(-1), data0.view(torch.uint8).reshape(-1)))
        except Exception as e:
            bad.append((mod_name, tuple(qs.shape), repr(e)[:120]))
    print(f"{name}: 4-bit layer shapes {dict(shapes)}; packed conversion + inverse exact on {ok} layers; failed: {bad}")
