"""Prompt formats for instruction tuning.

The prompt is everything the model reads; the response is what it learns to write, followed by EOS.
Only the response and its EOS carry loss: training on the prompt teaches the model to predict user
questions, and a response without EOS teaches it never to stop.
"""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def choose_template(requested: str, tokenizer) -> str:
    """'auto' uses the model's own chat template when it ships one: that is the format it was tuned on."""
    if requested == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if requested == "chat" and not getattr(tokenizer, "chat_template", None):
        from tunelab.errors import ConfigError

        raise ConfigError("data.template is 'chat' but this tokenizer has no chat template; use 'alpaca' or 'auto'")
    return requested


def to_messages(example: dict) -> list[dict]:
    """The conversation an example stands for, ending with the assistant reply when it has one."""
    if "messages" in example:
        return example["messages"]
    user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    messages = [{"role": "user", "content": user}]
    if example.get("output"):
        messages.append({"role": "assistant", "content": example["output"]})
    return messages


def render_prompt(example: dict, tokenizer, template: str) -> str:
    """The text the model reads before it answers."""
    if template == "chat":
        history = to_messages(example)
        if history[-1]["role"] == "assistant":
            history = history[:-1]
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    if "messages" in example:
        raise ValueError("the alpaca template takes instruction/input/output records, not messages")
    fmt = ALPACA_WITH_INPUT if example.get("input") else ALPACA_NO_INPUT
    return fmt.format(instruction=example["instruction"], input=example.get("input", ""))


def response_text(example: dict) -> str:
    return example["messages"][-1]["content"] if "messages" in example else example["output"]
