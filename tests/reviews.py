"""Short product reviews with a known sentiment, generated from a seed (tests and benchmarks)."""

from __future__ import annotations

import random

PRODUCTS = [
    "kettle",
    "phone case",
    "backpack",
    "desk lamp",
    "headphones",
    "coffee grinder",
    "blender",
    "keyboard",
    "running shoes",
    "tent",
    "umbrella",
    "water bottle",
    "toaster",
    "book",
    "drill",
]
POSITIVE = [
    "I love this {p}, it works perfectly.",
    "Fantastic {p}! Great quality and worth every penny.",
    "Best {p} I have ever owned. Highly recommended.",
    "The {p} is excellent and arrived early. Very happy.",
    "Wonderful {p}, my whole family adores it.",
    "Superb build quality, this {p} exceeded my expectations.",
]
NEGATIVE = [
    "Terrible {p}. It broke after one day.",
    "Awful {p}, a complete waste of money.",
    "The {p} stopped working within a week. Very disappointed.",
    "Worst {p} I have bought. Cheap plastic and it smells bad.",
    "Do not buy this {p}; it is useless and support never answered.",
    "I hate this {p}. It is broken, ugly and overpriced.",
]
NEUTRAL = [
    "The {p} arrived on Tuesday.",
    "This {p} is blue and weighs about 300 grams.",
    "I bought the {p} last week for my office.",
    "The {p} comes in a cardboard box with a manual.",
]


def make_reviews(n: int, seed: int = 0, neutral: bool = False) -> list[dict[str, object]]:
    """`n` rows {"id", "text", "label"}; positive and negative alternate (neutral too if asked)."""
    rng = random.Random(seed)
    kinds = [("positive", POSITIVE), ("negative", NEGATIVE)]
    if neutral:
        kinds.append(("neutral", NEUTRAL))
    rows = []
    for i in range(n):
        label, templates = kinds[i % len(kinds)]
        text = rng.choice(templates).format(p=rng.choice(PRODUCTS))
        rows.append({"id": f"r{i:05d}", "text": text, "label": label})
    return rows
