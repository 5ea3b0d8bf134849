"""Built-in synthetic data generators for toy tasks (tests, smoke runs, the testbed).

A generator is a deterministic function ``(n_rows, seed) -> list[dict]`` whose dicts carry the
columns its task spec reads. Same arguments, same rows, on every machine and Python run (only
``random.Random`` with an int seed is used). Different seeds give independent streams; toy rows
are drawn from a small space, so two streams may contain some identical rows.
"""

from __future__ import annotations

import random
import string
from typing import Any, Callable

Generator = Callable[[int, int], list[dict[str, Any]]]

POSITIVE_WORDS = ("good", "great", "happy", "love", "nice", "fun", "best", "fine")
NEGATIVE_WORDS = ("bad", "awful", "sad", "hate", "poor", "dull", "worst", "ugly")
POLARITY_LABEL_NOISE = 0.1


def polarity_rows(n_rows: int, seed: int) -> list[dict[str, Any]]:
    """Rows ``{"text": "good sad love", "label": 1}``: 3-5 polarity words, label = the majority
    polarity (1 positive, 0 negative; never a tie), flipped with probability 10%."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n_rows):
        length = rng.randint(3, 5)
        majority = rng.randint(0, 1)
        n_major = rng.randint(length // 2 + 1, length)
        major_words, minor_words = (
            (POSITIVE_WORDS, NEGATIVE_WORDS) if majority == 1 else (NEGATIVE_WORDS, POSITIVE_WORDS)
        )
        words = [rng.choice(major_words) for _ in range(n_major)]
        words += [rng.choice(minor_words) for _ in range(length - n_major)]
        rng.shuffle(words)
        label = 1 - majority if rng.random() < POLARITY_LABEL_NOISE else majority
        rows.append({"text": " ".join(words), "label": label})
    return rows


def reverse_rows(n_rows: int, seed: int) -> list[dict[str, Any]]:
    """Rows ``{"text": "q x b", "answer": "b x q"}``: 3 random lowercase letters and their reverse."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n_rows):
        letters = [rng.choice(string.ascii_lowercase) for _ in range(3)]
        rows.append({"text": " ".join(letters), "answer": " ".join(reversed(letters))})
    return rows


GENERATORS: dict[str, Generator] = {
    "polarity": polarity_rows,
    "reverse": reverse_rows,
}


def register_generator(name: str, fn: Generator, *, replace: bool = False) -> Generator:
    """Register ``fn`` as generator ``name`` (task specs refer to it by name). Re-registering the
    same function is a no-op; another function under a taken name needs ``replace=True``."""
    existing = GENERATORS.get(name)
    if existing is not None and existing is not fn and not replace:
        raise ValueError(f"generator {name!r} is already registered")
    GENERATORS[name] = fn
    return fn


def generate_rows(name: str, n_rows: int, seed: int) -> list[dict[str, Any]]:
    """Run the generator registered as ``name`` (``KeyError`` listing known names otherwise)."""
    if name not in GENERATORS:
        raise KeyError(f"unknown generator {name!r}; known: {', '.join(sorted(GENERATORS))}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    return GENERATORS[name](n_rows, seed)
