"""Writes the small instruction and chat datasets beside this file (instructions.jsonl,
chats.jsonl): one-sentence answers in a fixed form, so a model tuned on them for a few hundred
steps on CPU writes in their form, and an untuned one does not. Deterministic: run it again and
the files are the same. ``python tests/data/make_examples.py``"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("high", "low"), ("old", "new"),
    ("early", "late"), ("light", "dark"), ("strong", "weak"), ("happy", "sad"), ("long", "short"),
    ("rich", "poor"), ("wet", "dry"), ("open", "closed"), ("full", "empty"), ("hard", "soft"),
    ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"), ("true", "false"), ("first", "last"),
    ("inside", "outside"), ("up", "down"), ("left", "right"), ("near", "far"), ("young", "old"),
    ("good", "bad"), ("heavy", "light"), ("deep", "shallow"), ("wide", "narrow"), ("sweet", "sour"),
]
NOUNS = ["river", "garden", "window", "teacher", "planet", "bottle", "candle", "forest", "letter",
         "market", "pencil", "castle", "engine", "ladder", "mirror", "needle", "pocket", "rabbit",
         "saddle", "tunnel", "wagon", "basket", "button", "carpet", "dragon", "flower", "hammer",
         "island", "jacket", "kitten", "lemon", "monkey", "orange", "parrot", "rocket", "singer",
         "tiger", "violin", "wallet", "anchor"]
CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Poland", "Warsaw"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"),
    ("Egypt", "Cairo"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "Delhi"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
    ("Cuba", "Havana"), ("Russia", "Moscow"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
]
HERE = Path(__file__).parent


def facts():
    """(question, instruction, input, answer) for every fact, in a fixed order."""
    out = []
    for a, b in OPPOSITES:
        for x, y in ((a, b), (b, a)):
            out.append((f"What is the opposite of {x}?", "Give the opposite of the word.", x,
                        f"The opposite of {x} is {y}."))
    for noun in NOUNS:
        out.append((f"What is the plural of {noun}?", "Write the plural of the noun.", noun,
                    f"The plural of {noun} is {noun}s."))
    for n in range(1, 81):
        out.append((f"Which number comes after {n}?", "Say which number comes next.", str(n),
                    f"After {n} comes {n + 1}."))
    for country, city in CAPITALS:
        out.append((f"What is the capital of {country}?", "Name the capital city.", country,
                    f"The capital of {country} is {city}."))
    return out


def instructions():
    return [{"instruction": i, "input": x, "output": a} for _, i, x, a in facts()]


def chats(seed: int = 0):
    """One question per conversation; every third has a system turn, every fifth a second
    question answered in the same form."""
    rng = random.Random(seed)
    all_facts = facts()
    rows = []
    for k, (question, _, _, answer) in enumerate(all_facts):
        messages = []
        if k % 3 == 0:
            messages.append({"role": "system", "content": "Answer in one sentence."})
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
        if k % 5 == 0:
            q2, _, _, a2 = rng.choice(all_facts)
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": messages})
    return rows


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


if __name__ == "__main__":
    print(write(HERE / "instructions.jsonl", instructions()))
    print(write(HERE / "chats.jsonl", chats()))
