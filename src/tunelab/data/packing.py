"""Sequence packing: several tokenized examples per row of up to max_length tokens, with no padding between them.

Padding costs compute in proportion to the gap between an example and the longest in its batch; Alpaca
examples average ~110 tokens under a 256 limit, so about half of every padded batch is filler. A packed row
holds several examples end to end, and three things keep each example exactly as it was on its own:

- Positions restart at 0 for every example (`position_ids`), so rotary/learned positions are unchanged.
- Attention stays inside each example. Given `position_ids` and *no* 2D attention mask, transformers reads
  every restart of the positions as a sequence boundary and builds a block-diagonal causal mask
  (`masking_utils.find_packed_sequence_indices`; flash-attention turns the same restarts into cu_seqlens).
  It does so only when it gets no mask and no KV cache, so CausalLM passes the mask as None and
  use_cache=False for packed batches; the batch's `attention_mask` is kept only to count real tokens.
- The loss never crosses a boundary: each example's first token is labelled IGNORE_INDEX, so the previous
  example's last token is never asked to predict it. Unpacked, that label is never a target either (the
  next-token shift drops it), so every example contributes exactly the loss terms it had alone.

tests/test_packing.py checks the per-example losses and the gradients against unpacked batches.

Rows are filled best-fit decreasing (longest example first, into the row it fills most tightly): a pure
function of the features, so a resumed run rebuilds the same rows, and the loop's seeded batch plan
shuffles the rows each epoch.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from tunelab.models.task_models import IGNORE_INDEX


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows whose lengths sum to at most `capacity` (best-fit decreasing)."""
    rows: list[list[int]] = []
    rows_with_room: dict[int, list[int]] = {}  # spare tokens -> rows with exactly that many spare
    spare_sizes: list[int] = []  # the keys of rows_with_room, sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep input order
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        at = bisect_left(spare_sizes, n)
        if at == len(spare_sizes):
            row, room = len(rows), capacity
            rows.append([])
        else:
            room = spare_sizes[at]
            row = rows_with_room[room].pop()
            if not rows_with_room[room]:
                del rows_with_room[room]
                spare_sizes.pop(at)
        rows[row].append(i)
        left = room - n
        if left:
            if left not in rows_with_room:
                rows_with_room[left] = []
                insort(spare_sizes, left)
            rows_with_room[left].append(row)
    return rows


def pack_features(features: list[dict], max_length: int) -> list[dict]:
    """Token-labelled features -> packed rows with `input_ids`, `labels` and per-example `position_ids`."""
    packed = []
    for row in pack_rows([len(f["input_ids"]) for f in features], max_length):
        input_ids, labels, position_ids = [], [], []
        for i in row:
            f = features[i]
            input_ids += f["input_ids"]
            labels += [IGNORE_INDEX] + f["labels"][1:]
            position_ids += range(len(f["input_ids"]))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return packed
