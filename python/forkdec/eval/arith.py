"""A generated set of arithmetic word problems with exact answers.

`arith_problems(count, seed, steps, max_start, max_change)`: problem i is
drawn by `random.Random(f"{seed}:{i}")` (so problem i is the same whatever
the count): a person starts with a number of items (1..max_start) and then
`steps` events happen, each a gain or a loss of 1..max_change items (a loss
never takes more than is left) or, with `multiply`, a doubling or tripling;
the question asks how many are left. The answer is computed as the events are
drawn, so it is exact. Difficulty grows with `steps` and the magnitudes; the
defaults are tuned so that one greedy path of the embedded SmolLM2-135M is
right between 20% and 60% of the time (measured: bench/results/reasoning.md).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Max", "Nora",
         "Omar", "Paul", "Rosa", "Sam", "Tara", "Uma", "Will")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards")
FRIENDS = ("a friend", "her brother", "his sister", "a neighbor", "the teacher", "a classmate")

DEFAULT_SEED = 17
DEFAULT_STEPS = 1
DEFAULT_MAX_START = 20
DEFAULT_MAX_CHANGE = 9


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the exact integer, as text


def _problem(rng: random.Random, steps: int, max_start: int, max_change: int, multiply: bool) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(1, max_start)
    sentences = [f"{name} has {total} {item}."]
    for _ in range(steps):
        kind = rng.choice(("gain", "loss", "times") if multiply else ("gain", "loss"))
        if kind == "loss" and total > 1:
            b = rng.randint(1, min(max_change, total - 1))
            total -= b
            sentences.append(rng.choice((f"Then {name} gives {b} {item} to {rng.choice(FRIENDS)}.",
                                         f"Then {name} loses {b} {item}.")))
        elif kind == "times":
            f = rng.choice((2, 3))
            total *= f
            sentences.append(f"Then the number of {item} {name} has {'doubles' if f == 2 else 'triples'}.")
        else:
            b = rng.randint(1, max_change)
            total += b
            sentences.append(rng.choice((f"Then {name} buys {b} more {item}.",
                                         f"Then {rng.choice(FRIENDS)} gives {name} {b} more {item}.")))
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(sentences), str(total))


def arith_problems(count: int, seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS,
                   max_start: int = DEFAULT_MAX_START, max_change: int = DEFAULT_MAX_CHANGE,
                   multiply: bool = False) -> list[Problem]:
    """`count` problems (see the module docstring); the same arguments give the same problems."""
    for name, value, low in (("count", count, 0), ("steps", steps, 1), ("max_start", max_start, 1),
                             ("max_change", max_change, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
    return [_problem(random.Random(f"{seed}:{i}"), steps, max_start, max_change, multiply) for i in range(count)]
