"""Link each glossary term at its first use in a guide: `python docs/site/glossary_links.py docs/0*.md`.

The first use is the first occurrence in prose: not in a heading, a code block or span, an HTML tag, or the
text of another link. tests/test_docs.py checks that running this again would change nothing, so a new
paragraph that uses a term first gets its link.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# anchor in docs/glossary.md -> the words that name it (case-sensitive patterns are the acronyms)
TERMS: dict[str, str] = {
    "full-fine-tuning": r"(?i:full fine-tuning)",
    "fine-tuning": r"(?i:fine-tuning)",
    "pretrained-model": r"(?i:pretrained model)",
    "parameter": r"(?i:parameters?)",
    "cross-entropy": r"(?i:cross-entropy)",
    "gradient-accumulation": r"(?i:gradient accumulation)",
    "gradient-checkpointing": r"(?i:gradient checkpointing)",
    "gradient": r"(?i:gradients?)",
    "learning-rate-schedule": r"(?i:learning-rate schedules?)",
    "learning-rate": r"(?i:learning rates?)",
    "warmup": r"(?i:warmup)",
    "adamw": r"AdamW",
    "weight-decay": r"(?i:weight decay)",
    "epoch": r"(?i:epochs?)",
    "batch-size": r"(?i:batch size)",
    "overfitting": r"(?i:overfitting)",
    "underfitting": r"(?i:underfitting)",
    "validation-set": r"(?i:validation set)",
    "test-set": r"(?i:test set)",
    "dropout": r"(?i:dropout)",
    "real-tokens-per-second": r"(?i:real tokens per second|real tokens/s)",
    "token": r"(?i:tokens?)",
    "encoder": r"(?i:encoders?)",
    "decoder": r"(?i:decoders?)",
    "pooling": r"(?i:pooling)",
    "classification-head": r"(?i:classification head)",
    "padding": r"(?i:padding)",
    "packing": r"(?i:packing)",
    "eos": r"EOS",
    "chat-template": r"(?i:chat template)",
    "peft": r"PEFT",
    "lora": r"LoRA",
    "dora": r"DoRA",
    "qlora": r"QLoRA",
    "double-quantization": r"(?i:double quantization)",
    "quantization": r"(?i:quantization)",
    "nf4": r"NF4",
    "prompt-tuning": r"(?i:prompt tuning)",
    "prefix-tuning": r"(?i:prefix tuning)",
    "ia3": r"IA3",
    "adapter-merging": r"(?i:adapter merging|merging adapters)",
    "task-vector": r"(?i:task vectors?)",
    "ties": r"TIES",
    "dare": r"DARE",
    "task-routing": r"(?i:task routing)",
    "multi-task-learning": r"(?i:multi-task learning)",
    "adapter": r"(?i:adapters?)",
    "accuracy": r"(?i:accuracy)",
    "macro-f1": r"(?i:macro F1)",
    "perplexity": r"(?i:perplexity)",
    "nats": r"(?i:nats)",
    "activations": r"(?i:activations)",
    "rss": r"RSS",
    "peak-memory": r"(?i:peak memory)",
    "flops": r"FLOPs",
    "mfu": r"MFU",
    "mixed-precision": r"(?i:mixed precision)",
    "bf16": r"bf16",
    "sdpa": r"SDPA",
    "checkpoint": r"(?i:checkpoints?)",
    "safetensors": r"(?i:safetensors)",
    "run-directory": r"(?i:run directory)",
    "ddp": r"DDP",
    "fsdp": r"FSDP",
    "zero": r"ZeRO",
}
# Order matters: a longer term comes before a shorter one it contains ("double quantization", "quantization").
PATTERNS = {anchor: re.compile(rf"(?<![\w-])({words})(?![\w-])") for anchor, words in TERMS.items()}
# Spans that are not prose: inline code, links (text and target), HTML tags, math.
SKIP = re.compile(r"`[^`]*`|!?\[[^\]]*\]\([^)]*\)|<[^>]+>|\$[^$]+\$")
GLOSSARY_LINK = re.compile(r"\[([^\]]*)\]\((?:\./)?glossary\.md#([\w-]+)\)")


def _prose_lines(lines: list[str]):
    """(index, line) of the lines that hold prose: outside fences, not headings."""
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced and not line.lstrip().startswith("#"):
            yield i, line


def _first_use(lines: list[str], anchor: str) -> tuple[int, int, int, bool] | None:
    """(line, start, end, already linked) of the term's first prose use, or None."""
    pattern = PATTERNS[anchor]
    for i, line in _prose_lines(lines):
        pos = 0
        for span in [*SKIP.finditer(line), None]:
            end = span.start() if span else len(line)
            match = pattern.search(line, pos, end)
            if match:
                return i, match.start(1), match.end(1), False
            if span is None:
                break
            linked = GLOSSARY_LINK.fullmatch(span.group(0))
            if linked and pattern.search(linked.group(1)) and linked.group(2) == anchor:
                return i, span.start(), span.end(), True
            pos = span.end()
    return None


def link_first_uses(text: str, glossary: str = "glossary.md") -> str:
    """The text with each term's first prose use linked to glossary#anchor (longer terms first)."""
    lines = text.split("\n")
    for anchor in TERMS:
        found = _first_use(lines, anchor)
        if found and not found[3]:
            i, start, end, _ = found
            line = lines[i]
            lines[i] = f"{line[:start]}[{line[start:end]}]({glossary}#{anchor}){line[end:]}"
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for name in paths:
        path = Path(name)
        text = path.read_text(encoding="utf-8")
        linked = link_first_uses(text)
        if linked != text:
            path.write_text(linked, encoding="utf-8")
            print(f"linked glossary terms in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
