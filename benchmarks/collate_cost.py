"""How long tunelab's collate takes per batch, to weigh it against a training step (is a DataLoader with
worker processes worth it?). 16 examples of 100-512 random token ids, mean over 20 batches, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/collate_cost.py
"""

import random
import time

from tunelab.data.batching import collate


def main() -> None:
    rng = random.Random(0)
    features = [{"input_ids": [rng.randrange(1000, 20000) for _ in range(rng.randrange(100, 513))], "labels": 1}
                for _ in range(320)]
    start = time.perf_counter()
    batches = [collate(features[i : i + 16], 0) for i in range(0, len(features), 16)]
    per_batch = (time.perf_counter() - start) / len(batches)
    print(f"collate, 16 examples of 100-512 tokens: {per_batch * 1e3:.2f} ms per batch")


if __name__ == "__main__":
    main()
