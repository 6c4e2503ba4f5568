"""The report's figures, drawn with matplotlib's Agg renderer straight to PNG files.

Figures are built as `matplotlib.figure.Figure` objects on an explicit Agg canvas instead of through
pyplot: pyplot keeps global state and picks a GUI backend when one is around, which would open windows
(or fail on a headless box) when a report is written from a notebook or a training script.
Each function takes plain numbers, writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tunelab.report.units import GIB

DPI = 110
TRAIN_COLOR = "#1f77b4"
VALIDATION_COLOR = "#d62728"
UNTUNED_COLOR = "#9e9e9e"


def _figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


# --------------------------------------------------------------------- one run


def loss_curve(
    path: Path, train_log: list[dict], validation_log: list[dict], title: str, loss_label: str = "loss (nats)"
) -> Path | None:
    """Training loss by step; validation loss as points on the same axis when logged, else validation
    accuracy / macro F1 on a second axis (classification validation lines carry no loss)."""
    train = [(r["step"], r["loss"]) for r in train_log if r.get("loss") is not None]
    if not train and not validation_log:
        return None
    fig, ax = _figure()
    if train:
        ax.plot(*zip(*train), color=TRAIN_COLOR, marker="." if len(train) < 40 else None, label="train loss")
    val_loss = [(r["step"], r["loss"]) for r in validation_log if r.get("loss") is not None]
    handles, labels = ax.get_legend_handles_labels()
    if val_loss:
        ax.plot(*zip(*val_loss), color=VALIDATION_COLOR, marker="o", linestyle="--", label="validation loss")
        handles, labels = ax.get_legend_handles_labels()
    else:
        scores = [
            (key, [(r["step"], r[key]) for r in validation_log if r.get(key) is not None])
            for key in ("accuracy", "f1_macro")
        ]
        scores = [(key, points) for key, points in scores if points]
        if scores:
            right = ax.twinx()
            for (key, points), marker in zip(scores, ("o", "s")):
                name = "validation accuracy" if key == "accuracy" else "validation macro F1"
                right.plot(*zip(*points), color=VALIDATION_COLOR, marker=marker, linestyle="--", label=name,
                           alpha=1.0 if marker == "o" else 0.6)
            right.set_ylabel("validation score (0-1)")
            right.set_ylim(max(0.0, min(v for _, p in scores for _, v in p) - 0.05), 1.005)
            more_h, more_l = right.get_legend_handles_labels()
            handles, labels = handles + more_h, labels + more_l
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(loss_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if handles:  # below the axes: a twin axis's points would hide under a legend inside them
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(handles), frameon=False)
    return _save(fig, path)


def confusion_matrix(path: Path, matrix: list[list[int]], labels: list[str], title: str) -> Path:
    """Counts with the row percentage (share of that true class) in each cell; colour = row share, so a
    small class's errors are as visible as a large one's."""
    n = len(matrix)
    size = min(3.2 + 0.55 * n, 12)
    fig, ax = _figure(size + 1.2, size)
    shares = [[c / max(sum(row), 1) for c in row] for row in matrix]
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    font = 10 if n <= 6 else max(5, 10 - (n - 6) // 2)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            color = "white" if shares[i][j] > 0.6 else "black"
            ax.text(j, i, f"{count}\n{100 * shares[i][j]:.1f}%", ha="center", va="center", color=color, fontsize=font)
    names = labels if len(labels) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    return _save(fig, path)


def perplexity_bars(path: Path, tuned: float, untuned: float | None, title: str) -> Path:
    fig, ax = _figure(5.5, 4)
    names, values, colors = (["untuned", "tuned"], [untuned, tuned], [UNTUNED_COLOR, TRAIN_COLOR])
    if untuned is None:
        names, values, colors = names[1:], values[1:], colors[1:]
    bars = ax.bar(names, values, color=colors, width=0.55)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(title)
    ax.set_ylim(0, max(values) * 1.18)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------- comparison


def grouped_bars(
    path: Path, methods: list[str], series: dict[str, list[float | None]], ylabel: str, title: str,
    digits: int = 4, colors: list | None = None, xlabel: str = "method",
) -> Path:
    """One group per method, one bar per series (e.g. accuracy and macro F1), values printed on the bars."""
    fig, ax = _figure(max(6.0, 1.1 * len(methods) * max(1, len(series)) + 2), 4.4)
    width = 0.8 / len(series)
    colors = colors or _colors(len(series))
    top = 0.0
    for k, ((name, values), color) in enumerate(zip(series.items(), colors)):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(methods))]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(xs, heights, width=width, label=name, color=color)
        ax.bar_label(bars, labels=[f"{v:.{digits}f}" if v is not None else "" for v in values], padding=2,
                     fontsize=8)
        top = max([top] + heights)
    ax.set_xticks(range(len(methods)), methods, rotation=20 if len(methods) > 5 else 0)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.set_ylim(0, top * 1.15 or 1)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(loc="lower right")
    return _save(fig, path)


def loss_curves(path: Path, curves: dict[str, list[tuple[int, float]]], title: str) -> Path | None:
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return None
    fig, ax = _figure()
    for (name, points), color in zip(curves.items(), _colors(len(curves))):
        ax.plot(*zip(*points), label=name, color=color, marker="." if len(points) < 40 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def scatter(
    path: Path, points: list[tuple[str, float, float]], xlabel: str, ylabel: str, title: str, log_x: bool = False,
    y_max: float | None = None,
) -> Path | None:
    """One labelled point per method: (name, x, y). y_max caps the axis (1.0 for accuracy: no room above 100%)."""
    points = [(n, x, y) for n, x, y in points if x is not None and y is not None and (x > 0 or not log_x)]
    if not points:
        return None
    fig, ax = _figure()
    for (name, x, y), color in zip(points, _colors(len(points))):
        ax.scatter([x], [y], s=60, color=color, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9)
    if log_x:
        ax.set_xscale("log")
        ax.margins(x=0.15)
    ys = [y for _, _, y in points]
    span = (max(ys) - min(ys)) or abs(max(ys)) * 0.05 or 1
    top = max(ys) + 0.35 * span
    ax.set_ylim(min(ys) - 0.25 * span, top if y_max is None else min(top, y_max + 0.02 * span + 0.005))
    if not log_x:
        xs = [x for _, x, _ in points]
        xspan = (max(xs) - min(xs)) or abs(max(xs)) * 0.1 or 1
        ax.set_xlim(min(xs) - 0.15 * xspan, max(xs) + 0.3 * xspan)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def cost_bars(
    path: Path, methods: list[str], wall_s: list[float | None], measured: list[float | None],
    estimated: list[float | None],
) -> Path:
    """Two panels: training wall time, and peak memory (measured, and the estimate beside it when any)."""
    fig = Figure(figsize=(max(8.0, 1.6 * len(methods) + 4), 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    colors = _colors(len(methods))
    minutes = [v / 60 if v is not None else 0 for v in wall_s]
    bars = left.bar(methods, minutes, color=colors)
    left.bar_label(bars, labels=[f"{m:.1f}" if v is not None else "" for m, v in zip(minutes, wall_s)],
                   padding=2, fontsize=8)
    left.set_ylabel("training wall time (minutes)")
    left.set_title("Training time")
    has_estimate = any(v is not None for v in estimated)
    width = 0.4 if has_estimate else 0.8
    xs = range(len(methods))
    gib = [v / GIB if v is not None else 0 for v in measured]
    bars = right.bar([x - width / 2 if has_estimate else x for x in xs], gib, width=width, color=colors,
                     label="measured")
    right.bar_label(bars, labels=[f"{g:.2f}" if v is not None else "" for g, v in zip(gib, measured)], padding=2,
                    fontsize=8)
    if has_estimate:
        est = [v / GIB if v is not None else 0 for v in estimated]
        bars = right.bar([x + width / 2 for x in xs], est, width=width, color=colors, alpha=0.45, hatch="//",
                         label="estimated")
        right.bar_label(bars, labels=[f"{g:.2f}" if v is not None else "" for g, v in zip(est, estimated)],
                        padding=2, fontsize=8)
        right.legend(loc="upper right")
    right.set_xticks(list(xs), methods)
    right.set_ylabel("peak memory (GiB)")
    right.set_title("Peak memory")
    for ax in (left, right):
        ax.set_xlabel("method")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, (ax.get_ylim()[1] or 1) * 1.12)
        if len(methods) > 4:
            ax.tick_params(axis="x", labelrotation=25)
    return _save(fig, path)


# --------------------------------------------------------------------- data checks


def length_histogram(path: Path, lengths: dict[str, list[int]], max_length: int | None, title: str) -> Path | None:
    """Token lengths per file (step histograms on a log-scaled count axis, so a long tail stays visible),
    with max_length drawn where truncation starts."""
    lengths = {name: values for name, values in lengths.items() if values}
    if not lengths:
        return None
    import numpy as np

    fig, ax = _figure()
    top = max(max(v) for v in lengths.values())
    bins = np.linspace(0, top + 1, min(60, top + 2))
    for (name, values), color in zip(lengths.items(), _colors(len(lengths))):
        ax.hist(values, bins=bins, histtype="step", linewidth=1.6, color=color, label=f"{name} ({len(values):,} rows)")
    if max_length:
        ax.axvline(max_length, color=VALIDATION_COLOR, linestyle="--", label=f"max_length {max_length}")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per row (before truncation)")
    ax.set_ylabel("rows (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
