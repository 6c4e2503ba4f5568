"""Where a merged export's max |delta logit| comes from, and what a wrong merge looks like beside it.

    python examples/intermediate/export/merge_precision.py RUN_DIR [OUT.json]

For a LoRA run on a Llama-architecture decoder (smollm2-alpaca-lora.yaml), on the parity inputs `tunelab export`
uses (the same batches of 8, every real position), max |delta logit| of:

  noise_floor             the run's unmerged model in fp32 vs the same model in fp64 (the floor no fp32 export
                          can be expected to beat)
  noise_floor_as_exported what `tunelab export` measures as that floor (noise_floor.py: transformers' own fp64,
                          which still normalises in fp32)
  fp32_merge_vs_fp32      merged in fp32 (PEFT's merge_and_unload on the fp32 model) vs the unmerged fp32 model
  fp64_merge_vs_fp32      merged in fp64 (the whole model upcast, merge_and_unload, cast to fp32 once) vs the
                          unmerged fp32 model: what the export's gate measures (tunelab's layer-by-layer fp64 merge
                          gives the same weights, bit for bit: checked below)
  ..._vs_fp64             the same merges against the fp64 reference
  weights_only_vs_fp64    the fp64 merge's fp32 weights evaluated in fp64 vs the fp64 reference: what rounding the
                          merged weights to fp32 costs, with no fp32 arithmetic
and three wrong merges (fp64, as the export merges) against the fp32 model, which the gate must refuse:

  wrong_scaling_doubled   every layer's LoRA scaling doubled (alpha/r read as 2 alpha/r)
  wrong_one_lora_step     one layer's B moved by one Adam step (the run's lr, random signs): the adapter of one
                          step earlier or later, in one of its 210 layers
  wrong_one_tensor_1e-5   one merged tensor moved by 1e-5 per weight (random signs): one Adam step at lr 1e-5

transformers' Llama normalises in fp32 whatever the model's dtype (LlamaRMSNorm casts to fp32); for every number
but noise_floor_as_exported an fp64 input is normalised in fp64 here, so the fp64 reference rounds nowhere (fp32
inputs are computed as before). Rotary angles are computed in fp32 in every model alike: the same numbers on
both sides.
"""

import copy
import json
import sys

import torch

from tunelab.export.noise_floor import fp32_noise_floor
from tunelab.export.parity import batches
from tunelab.export.source import load_run, parity_inputs
from tunelab.methods.peft_base import merge_in_fp64

WRONG_LAYER = "layers.15.self_attn.q_proj"  # a layer in the middle of SmolLM2's 30


def normalise_in_input_precision():
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):
        x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden_states.dtype)

    modeling_llama.LlamaRMSNorm.forward = forward


def merged_whole(run_dir, dtype):
    """The run's model merged with merge_and_unload in `dtype`, its weights then cast to fp32."""
    model = load_run(run_dir).model.to(dtype)
    model.backbone = model.backbone.merge_and_unload()
    return model.to(torch.float32).eval()


def merged_wrong(run_dir, lr, mistake):
    model = load_run(run_dir).model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lora = {n: m for n, m in model.backbone.named_modules() if hasattr(m, "lora_B") and len(m.lora_B)}
        if mistake == "scaling_doubled":
            for m in lora.values():
                m.scaling = {k: 2 * v for k, v in m.scaling.items()}
        elif mistake == "one_lora_step":
            b = next(m for n, m in lora.items() if n.endswith(WRONG_LAYER)).lora_B["default"].weight
            b.add_(lr * torch.randint(0, 2, b.shape, generator=gen).mul(2).sub(1).to(b.dtype))
    model.backbone = merge_in_fp64(model.backbone)
    if mistake == "one_tensor_1e-5":
        with torch.no_grad():
            w = next(p for n, p in model.backbone.named_parameters() if n.endswith(WRONG_LAYER + ".weight"))
            w.add_(1e-5 * torch.randint(0, 2, w.shape, generator=gen).mul(2).sub(1).to(w.dtype))
    return model.eval()


@torch.inference_mode()
def main(run_dir, out=None):
    trained = load_run(run_dir)
    inputs = parity_inputs(trained)
    fp32 = trained.model.eval()
    worst = {"noise_floor_as_exported": fp32_noise_floor(fp32, inputs)}
    normalise_in_input_precision()
    fp64 = copy.deepcopy(fp32).to(torch.float64)
    whole = merged_whole(run_dir, torch.float64)
    layered = load_run(run_dir).model
    layered.backbone = merge_in_fp64(layered.backbone)
    same = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), layered.state_dict().values()))
    del layered
    merged = {"fp32_merge": merged_whole(run_dir, torch.float32), "fp64_merge": whole}
    lr = trained.cfg.train.lr
    mistakes = ("scaling_doubled", "one_lora_step", "one_tensor_1e-5")
    wrong = {f"wrong_{m}": merged_wrong(run_dir, lr, m) for m in mistakes}
    weights_only = copy.deepcopy(whole).to(torch.float64)

    def note(name, a, b):
        worst[name] = max(worst.get(name, 0.0), float((a - b).abs().max()))

    for ids, mask, _, _ in batches(inputs.features, inputs.pad_id, 8):
        real = mask.bool()

        def logits(model):
            out = model(ids, mask).logits.to(torch.float64)
            return out if inputs.classification else out[real]

        ref32, ref64 = logits(fp32), logits(fp64)
        note("noise_floor", ref32, ref64)
        for name, model in merged.items():
            cand = logits(model)
            note(f"{name}_vs_fp32", cand, ref32)
            note(f"{name}_vs_fp64", cand, ref64)
            del cand
        note("weights_only_vs_fp64", logits(weights_only), ref64)
        for name, model in wrong.items():
            note(name, logits(model), ref32)
        worst["max_abs_reference_logit"] = max(worst.get("max_abs_reference_logit", 0.0), float(ref32.abs().max()))
    report = {"run": str(run_dir), "inputs": len(inputs.features), "source": inputs.source, "lr": lr,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "attention": getattr(trained.model.backbone.config, "_attn_implementation", None),
              "layer_by_layer_merge_equals_whole_fp64_merge": same, **worst}
    print(json.dumps(report, indent=2))
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
