from __future__ import annotations

import json
import random
import statistics
from typing import Any


def random_lengths(n: int, mean: int, range_ratio: float, rng: random.Random) -> list[int]:
    """``n`` lengths: all ``mean`` when range_ratio is 0, else uniform in mean * [1 - r, 1 + r]."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    lo, hi = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_prompts(lengths: list[int], vocab_size: int, rng: random.Random) -> list[list[int]]:
    """Random token ids, away from the special tokens at the start of most vocabularies."""
    low = min(100, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(n)] for n in lengths]


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in ps}}
    ordered = sorted(values)
    out = {"mean": statistics.fmean(ordered)}
    for p in ps:
        # nearest-rank percentile
        out[f"p{p}"] = ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]
    return out


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
