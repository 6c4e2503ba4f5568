"""Draw the guides' explanatory figures into docs/figures/ (matplotlib, Agg renderer, no display needed).

    .venv/bin/python docs/figures/make_figures.py                 # every figure, into docs/figures/
    .venv/bin/python docs/figures/make_figures.py --out /tmp/f lr-schedules memory-breakdown

The diagrams (LoRA, DoRA, adapter placements, prompt vs prefix, sharding) are drawn from their definitions.
Two figures come from tunelab's own code, so they change when the code does: the learning-rate schedules are
sampled from the scheduler a run builds (tunelab.train.optim.build_scheduler), and the memory breakdown is
`tunelab plan`'s estimate (tunelab.plan.estimate) of the quickstart config under each technique. The NF4 levels
are bitsandbytes' own table. tests/test_figures.py runs this script, so it cannot rot.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DPI = 110
FROZEN, TRAINED, DATA, ACCENT = "#cfd8dc", "#ffb74d", "#e3f2fd", "#1f77b4"


def _figure(width: float, height: float, axes: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, axes, i + 1) for i in range(axes)]


def _blank(ax, xlim=(0, 10), ylim=(0, 6)):
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")


def _box(ax, x, y, w, h, text, color, fontsize=9, **kw):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#37474f",
                                lw=1, **kw))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, color="#37474f", style="-|>", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=1.2, **kw))


def _save(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


# ----------------------------------------------------------------------------------------------- diagrams


def lora(out: Path) -> Path:
    fig, (ax,) = _figure(8.6, 3.6)
    _blank(ax, (0, 17), (0, 6.6))
    ax.add_patch(Rectangle((0.4, 0.8), 4.6, 4.6, fc=FROZEN, ec="#37474f"))
    ax.text(2.7, 3.1, "W\nfrozen\n$d_{out} \\times d_{in}$", ha="center", va="center", fontsize=11)
    ax.text(5.75, 3.1, "+", ha="center", va="center", fontsize=20)
    ax.add_patch(Rectangle((6.5, 0.8), 0.8, 4.6, fc=TRAINED, ec="#37474f"))
    ax.text(6.9, 0.35, "B\n$d_{out} \\times r$", ha="center", va="top", fontsize=9)
    ax.text(7.75, 3.1, "·", ha="center", va="center", fontsize=20)
    ax.add_patch(Rectangle((8.2, 4.6), 4.6, 0.8, fc=TRAINED, ec="#37474f"))
    ax.text(10.5, 4.35, "A   $r \\times d_{in}$", ha="center", va="top", fontsize=9)
    ax.annotate("", xy=(6.5, 5.75), xytext=(7.3, 5.75), arrowprops={"arrowstyle": "<->", "color": ACCENT})
    ax.text(6.9, 5.95, "rank r", ha="center", fontsize=9, color=ACCENT)
    ax.text(10.5, 2.6, "only A and B train:\n$r\\,(d_{in} + d_{out})$ values\ninstead of $d_{in}\\,d_{out}$\n\n"
            "B starts at 0, so at step 0\nthe model is the base model", ha="center", va="center", fontsize=9)
    ax.text(15.1, 3.1, "$h = W x + \\frac{\\alpha}{r} B A x$", ha="center", va="center", fontsize=13)
    ax.set_title("LoRA: a frozen weight plus a trained low-rank update", fontsize=11)
    return _save(fig, out, "lora")


def dora(out: Path) -> Path:
    fig, axes = _figure(8.6, 3.8, 2)
    w0, update = (3.0, 1.0), (-0.9, 0.9)
    for ax, title in zip(axes, ("LoRA: direction and length move together", "DoRA: direction by LoRA, length by m")):
        ax.set_xlim(-0.5, 4.2)
        ax.set_ylim(-0.3, 3.4)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title, fontsize=10)
        _arrow(ax, (0, 0), w0, color="#78909c")
        ax.text(w0[0] + 0.05, w0[1] - 0.25, "W (one column)", fontsize=8, color="#546e7a")
        moved = (w0[0] + update[0], w0[1] + update[1])
        _arrow(ax, w0, moved, color=TRAINED, style="-|>", linestyle="--")
        ax.text(moved[0] + 0.1, moved[1] + 0.05, "+ BA", fontsize=8, color="#ef6c00")
    _arrow(axes[0], (0, 0), (w0[0] + update[0], w0[1] + update[1]), color=ACCENT)
    axes[0].text(0.2, 1.35, "W + BA", fontsize=9, color=ACCENT)
    norm = math.hypot(w0[0] + update[0], w0[1] + update[1])
    direction = ((w0[0] + update[0]) / norm, (w0[1] + update[1]) / norm)
    m = 2.1
    _arrow(axes[1], (0, 0), (m * direction[0], m * direction[1]), color=ACCENT)
    axes[1].text(0.05, 1.7, "$m \\cdot \\frac{W + BA}{\\|W + BA\\|}$", fontsize=11, color=ACCENT)
    axes[1].text(2.2, 2.9, "m: a trained length per column", fontsize=8)
    return _save(fig, out, "dora")


def adapter_placements(out: Path) -> Path:
    fig, axes = _figure(9.6, 5.0, 3)
    titles = ("Houlsby (2 per layer)", "Pfeiffer (default, 1 per layer)", "parallel (beside the FFN)")
    for ax, kind, title in zip(axes, ("houlsby", "pfeiffer", "parallel"), titles):
        _blank(ax, (0, 6), (0, 10.5))
        ax.set_title(title, fontsize=10)
        _box(ax, 1.5, 0.3, 3, 0.8, "layer input", DATA)
        _box(ax, 1.5, 1.8, 3, 1.0, "attention", FROZEN)
        y = 2.8
        if kind == "houlsby":
            _box(ax, 1.9, 3.3, 2.2, 0.9, "adapter", TRAINED)
            _arrow(ax, (3, 2.8), (3, 3.3))
            y = 4.2
        _box(ax, 1.5, y + 0.5, 3, 0.7, "add & norm", "white", fontsize=8)
        _arrow(ax, (3, y), (3, y + 0.5))
        ffn_y = y + 1.7
        _box(ax, 1.5, ffn_y, 3, 1.0, "feed-forward", FROZEN)
        _arrow(ax, (3, y + 1.2), (3, ffn_y))
        top = ffn_y + 1.0
        if kind in ("houlsby", "pfeiffer"):
            _box(ax, 1.9, top + 0.5, 2.2, 0.9, "adapter", TRAINED)
            _arrow(ax, (3, top), (3, top + 0.5))
            top += 1.4
        else:
            _box(ax, 4.7, ffn_y, 1.25, 1.0, "adapter", TRAINED, fontsize=8)
            _arrow(ax, (3, ffn_y - 0.25), (5.3, ffn_y), connectionstyle="arc3,rad=-0.3")
            _arrow(ax, (5.3, ffn_y + 1.0), (3.1, top + 0.5), connectionstyle="arc3,rad=-0.3")
        _box(ax, 1.5, top + 0.5, 3, 0.7, "add & norm", "white", fontsize=8)
        _arrow(ax, (3, top), (3, top + 0.5))
        _arrow(ax, (3, 1.1), (3, 1.8))
    fig.text(0.5, 0.01, "grey: frozen pretrained sublayers; orange: the trained bottleneck "
             "(down-projection, non-linearity, up-projection starting at 0)", ha="center", fontsize=8)
    return _save(fig, out, "adapter-placements")


def prompt_vs_prefix(out: Path) -> Path:
    fig, axes = _figure(9.6, 4.4, 2)
    for ax, kind in zip(axes, ("prompt", "prefix")):
        _blank(ax, (0, 10), (0, 7.5))
        ax.set_title("prompt tuning: trained vectors at the input only" if kind == "prompt"
                     else "prefix tuning: trained keys and values in every layer", fontsize=10)
        for i in range(3):
            y = 1.6 + 1.8 * i
            _box(ax, 3.0, y, 6.6, 1.1, f"layer {i + 1}: attention + FFN (frozen)", FROZEN, fontsize=8)
            if kind == "prefix":
                _box(ax, 0.2, y + 0.1, 2.4, 0.9, "K, V prefix\n(trained)", TRAINED, fontsize=7)
                _arrow(ax, (2.6, y + 0.55), (3.0, y + 0.55))
        tokens = ["v1", "v2", "the", "film", "was", "great"] if kind == "prompt" else ["the", "film", "was", "great"]
        for j, token in enumerate(tokens):
            color = TRAINED if token.startswith("v") else DATA
            ax.add_patch(Rectangle((3.2 + 1.05 * j, 0.2), 0.9, 0.8, fc=color, ec="#37474f"))
            ax.text(3.65 + 1.05 * j, 0.6, token, ha="center", va="center", fontsize=7)
        _arrow(ax, (6.3, 1.0), (6.3, 1.6))
        if kind == "prompt":
            ax.text(1.4, 0.6, "n virtual\ntokens", ha="center", va="center", fontsize=8)
    return _save(fig, out, "prompt-vs-prefix")


def sharding(out: Path) -> Path:
    """Per-process memory in bytes per parameter under the rule of thumb of docs/08 (2 processes)."""
    fig, (ax,) = _figure(7.6, 3.4)
    n = 2
    rows = [  # (label, weights, gradients, optimizer state incl. fp32 master weights), bytes per parameter
        ("DDP", 2, 2, 12),
        ("ZeRO-2", 2, 2 / n, 12 / n),
        ("FSDP / ZeRO-3", 2 / n, 2 / n, 12 / n),
    ]
    colors = ("#90a4ae", "#4fc3f7", "#ffb74d")
    for i, (label, *parts) in enumerate(rows):
        left = 0.0
        for part, color, name in zip(parts, colors, ("weights (bf16)", "gradients (bf16)", "optimizer + fp32 master")):
            ax.barh(i, part, left=left, color=color, edgecolor="white", label=name if i == 0 else None)
            left += part
        ax.text(left + 0.2, i, f"{left:g} bytes/param", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 20)
    ax.set_xlabel("bytes per parameter held by each of 2 processes (full fine-tuning, AdamW, mixed precision)")
    ax.set_title("What each process holds: the rule of thumb, not a measurement", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return _save(fig, out, "sharding")


# ----------------------------------------------------------------------------------------------- from code


def lr_schedules(out: Path) -> Path:
    import torch

    from tunelab.train.optim import build_scheduler

    steps, warmup_ratio = 125, 0.06  # the quickstart: 125 optimizer steps, warmup_ratio 0.06
    fig, (ax,) = _figure(7.4, 3.6)
    for name in ("linear", "cosine", "constant"):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler(optimizer, name, steps, warmup_ratio)
        rates = []
        for _ in range(steps):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        ax.plot(range(1, steps + 1), rates, label=f"scheduler: {name}", lw=2)
    warm = round(steps * warmup_ratio)
    ax.axvspan(0, warm, color="#eeeeee")
    ax.text(warm / 2, 0.5, f"warmup\n{warm} steps", ha="center", fontsize=8)
    ax.set_xlabel("optimizer step (125 steps, warmup_ratio 0.06: the quickstart)")
    ax.set_ylabel("learning rate / train.lr")
    ax.set_title("Learning-rate schedules, sampled from tunelab's scheduler", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, "lr-schedules")


def memory_breakdown(out: Path) -> Path:
    from tunelab.config import load_config
    from tunelab.plan.estimate import GIB, estimate

    config = REPO / "examples" / "beginner" / "full-fine-tuning" / "config.yaml"
    techniques = [("full", []), ("lora", ["method.name=lora"]), ("qlora", ["method.name=qlora"]),
                  ("prompt", ["method.name=prompt"]), ("adapter", ["method.name=adapter"])]
    plans = [(name, estimate(load_config(config, ["train.precision=fp32", "train.lr=null", *extra]), device="cpu"))
             for name, extra in techniques]
    fig, (ax,) = _figure(8.2, 3.8)
    colors = ("#90a4ae", "#4fc3f7", "#ffb74d", "#81c784", "#ce93d8", "#f48fb1", "#e0e0e0")
    for i, (name, plan) in enumerate(plans):
        left = 0.0
        for (label, train_bytes, _), color in zip(plan.memory_rows()[:-1], colors):  # the last row is the total
            value = train_bytes / GIB
            ax.barh(i, value, left=left, color=color, edgecolor="white", label=label if i == 0 else None)
            left += value
        ax.text(left + 0.01, i, f"{left:.2f} GiB", va="center", fontsize=8)
    ax.set_yticks(range(len(plans)), [name for name, _ in plans])
    ax.invert_yaxis()
    ax.set_xlim(0, max(p.memory.total for _, p in plans) / GIB * 1.2)
    ax.set_xlabel("estimated memory at the training step's peak (GiB, process RSS on a CPU)")
    ax.set_title("tunelab plan on the quickstart (MiniLM, IMDB, batch 16 x 128 tokens, fp32)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, fontsize=7, frameon=False)
    return _save(fig, out, "memory-breakdown")


def nf4_levels(out: Path) -> Path:
    import numpy as np
    import torch

    from tunelab.methods.bitsandbytes_support import import_bitsandbytes

    code = import_bitsandbytes().functional.get_4bit_type("nf4", device="cpu").float()
    levels = sorted(float(v) for v in torch.unique(code))
    fig, (ax,) = _figure(7.6, 3.5)
    xs = np.linspace(-1.05, 1.05, 400)
    density = np.exp(-0.5 * (xs * 2.5) ** 2)  # a normal curve scaled to the block's absmax range
    ax.fill_between(xs, density, color="#e3f2fd", label="pretrained weights / absmax (roughly normal)")
    ax.vlines(levels, 0, 1.05, color="#ef6c00", lw=1.2, label=f"the {len(levels)} NF4 values")
    uniform = np.linspace(-1, 1, 16)
    ax.plot(uniform, [-0.08] * 16, "|", color="#546e7a", markersize=10, label="16 evenly spaced values, for contrast")
    ax.set_xlim(-1.1, 1.1)
    ax.set_yticks([])
    ax.set_xlabel("weight divided by its block's absmax")
    ax.set_title("NF4: 16 levels placed at normal quantiles (bitsandbytes' own table)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=7, frameon=False)
    return _save(fig, out, "nf4-levels")


FIGURES = {
    "lora": lora, "dora": dora, "adapter-placements": adapter_placements, "prompt-vs-prefix": prompt_vs_prefix,
    "sharding": sharding, "lr-schedules": lr_schedules, "memory-breakdown": memory_breakdown,
    "nf4-levels": nf4_levels,
}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"figures to draw (default: all): {', '.join(FIGURES)}")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: docs/figures)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = [FIGURES[name](args.out) for name in (args.names or FIGURES)]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
