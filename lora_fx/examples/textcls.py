"""A generated customer-message intent task for the MiniLM + LoRA demo.

Four intents over one shared vocabulary of products, parts and qualities::

    praise     "Honestly, the kettle turned out far from noisy."
    complaint  "My kettle has been anything but reliable since the update."
    question   "Is the lid of the kettle supposed to be this noisy?"
    request    "Could you send a new lid? The kettle is not quiet at all."

Praise and complaint use the *same* sentence frames; the label is the polarity of the quality word
flipped by a negation: ``praise = good XOR negated``. Every quality word and every negator appears in
both classes equally often (and in questions and requests too), so a bag-of-words view, which is
roughly what a mean-pooled frozen sentence embedding gives, cannot separate them; the encoder has to
learn that "far from noisy" is praise. Questions and requests also share vocabulary ("Could you
tell me..." vs "Could you send...").

Held-out split: every intent has its own sentence frames and the test split uses frames, and product
names, that never occur in training, so test accuracy measures generalisation to new phrasings.

Example:
    >>> train, test, labels = make_dataset(n_train=8, n_test=4)
    >>> labels
    ['praise', 'complaint', 'question', 'request']
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch

__all__ = ["ACTIONS", "CLOSERS", "encode", "LABELS", "make_dataset", "NEGATORS", "OPENERS", "PARTS",
    "products", "QUALITIES", "SENTIMENT_FRAMES", "SINCE", "TEMPLATES", "templates", "TEST_PRODUCTS",
    "TRAIN_PRODUCTS", "WHEN"]

LABELS: list[str] = ["praise", "complaint", "question", "request"]
PRAISE, COMPLAINT, QUESTION, REQUEST = range(4)

# (good, bad) antonym pairs.
QUALITIES: list[tuple[str, str]] = [
    ("quiet", "noisy"),
    ("sturdy", "flimsy"),
    ("reliable", "unreliable"),
    ("fast", "slow"),
    ("bright", "dim"),
    ("comfortable", "uncomfortable"),
    ("easy to clean", "hard to clean"),
    ("light", "heavy"),
    ("well made", "badly made"),
    ("simple to use", "confusing to use"),
]
NEGATORS: list[str] = ["not", "never", "far from", "anything but", "hardly", "in no way", "not at all"]
PARTS: list[str] = ["battery", "lid", "cable", "screen", "handle", "button", "charger", "fan", "switch", "case"]
SINCE: list[str] = ["since I bought it", "since last week", "since the update", "this month", "so far"]
WHEN: list[str] = ["after two days", "after the update", "on day one", "this morning", "last night"]
ACTIONS: list[str] = [
    "send a new {part}", "refund the {product}", "exchange the {product}", "cancel my {product} order",
    "book a repair for the {product}", "ship a replacement {product}", "send someone to fix the {part}",
    "swap the {part} for a new one",
]
# Product names are split too: test products never occur in training.
TRAIN_PRODUCTS: list[str] = [
    "kettle", "laptop", "vacuum", "blender", "printer", "router", "camera", "toaster", "monitor",
    "speaker", "heater", "drill",
]
TEST_PRODUCTS: list[str] = ["headphones", "air fryer", "desk lamp", "smartwatch", "tablet", "fridge"]

# Frames per intent; a leading "*" marks a held-out (test-only) frame.
# Slots: {product} {part} {q} (a quality, possibly negated) {since} {when} {action}.
# Praise and complaint share SENTIMENT_FRAMES: their label comes from the polarity of {q}.
SENTIMENT_FRAMES: list[str] = [
    "The {part} of my {product} is {q}.",
    "My {product} has been {q} {since}.",
    "Honestly, the {product} turned out {q}.",
    "I have to say the {part} on this {product} is {q}.",
    "This {product} feels {q} compared to my old one.",
    "After a week of use, the {product} is {q}.",
    "I bought the {product} for my dad and it is {q}.",
    "*Just so you know, my {product} is {q} {since}.",
    "*The {product} I got last month is {q}.",
    "*Everyone at home agrees the {part} of the {product} is {q}.",
    "*For the price, this {product} is {q}.",
]
TEMPLATES: dict[str, list[str]] = {
    "praise": SENTIMENT_FRAMES,
    "complaint": SENTIMENT_FRAMES,
    "question": [
        "Is the {part} of the {product} supposed to be {q}?",
        "Does the {product} come with a spare {part}?",
        "How long does the {part} of a {product} usually last?",
        "I would like to know if the {product} gets {q} {when}.",
        "Could you tell me whether the {product} is {q} in winter?",
        "Can the {product} be refunded if the {part} is {q}?",
        "Is it normal that my {product} is {q} {since}?",
        "*Which {part} fits the {product}, the old one or the new one?",
        "*I am curious whether the {part} of the {product} is {q} for kids.",
        "*What does the warranty say if the {product} is {q}?",
        "*Do you know if the {product} stays {q} {since}?",
    ],
    "request": [
        "Please {action}.",
        "Could you {action}? The {product} is {q}.",
        "I would like you to {action} as soon as possible.",
        "The {product} is {q}, but I need you to {action}.",
        "Kindly {action}; the order number is below.",
        "I want you to {action} because the {part} is {q}.",
        "Can you {action} {when}? The {part} is {q}.",
        "*Would it be possible to {action} this week?",
        "*Go ahead and {action}, the {product} is back in its box.",
        "*My {product} was {q} {when}, so {action} for me.",
        "*Can someone {action} before Friday?",
    ],
}
OPENERS: list[str] = ["", "", "", "Hi, ", "Hello team, ", "So, ", "Quick note: ", "Hey, "]
CLOSERS: list[str] = ["", "", "", " Thanks.", " Thank you!", " Regards, Sam.", " Cheers."]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def templates(split: str) -> dict[str, list[str]]:
    """The frames of ``split`` (``"train"`` or ``"test"``) per intent, without the held-out marker."""
    _check_split(split)
    held_out = split == "test"
    return {
        label: [t.lstrip("*") for t in ts if t.startswith("*") == held_out] for label, ts in TEMPLATES.items()
    }


def products(split: str) -> list[str]:
    """The product names used in ``split`` (disjoint between train and test)."""
    _check_split(split)
    return TRAIN_PRODUCTS if split == "train" else TEST_PRODUCTS


def _quality(label: int, rng: random.Random) -> str:
    # Praise is "good" or "negated bad", complaint is "bad" or "negated good"; other intents draw
    # any of the four, so no word or negator is specific to one intent.
    good, bad = rng.choice(QUALITIES)
    negated = rng.random() < 0.5
    if label == PRAISE:
        positive = True
    elif label == COMPLAINT:
        positive = False
    else:
        positive = rng.random() < 0.5
    word = bad if positive == negated else good
    return f"{rng.choice(NEGATORS)} {word}" if negated else word


def _fill(template: str, label: int, product: str, rng: random.Random) -> str:
    part = rng.choice(PARTS)
    text = template.format(
        product=product,
        part=part,
        q=_quality(label, rng),
        since=rng.choice(SINCE),
        when=rng.choice(WHEN),
        action=rng.choice(ACTIONS).format(product=product, part=part),
    )
    opener = rng.choice(OPENERS)
    if opener and not text.startswith("I "):
        text = text[0].lower() + text[1:]
    text = opener + text + rng.choice(CLOSERS)
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)  # "a air fryer" -> "an air fryer"
    return text[0].upper() + text[1:]


def _generate(n: int, split: str, rng: random.Random) -> list[tuple[str, int]]:
    frames = templates(split)
    names = products(split)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    for i in range(n):
        label = i % len(LABELS)  # balanced: class counts differ by at most one
        for _ in range(1000):
            text = _fill(rng.choice(frames[LABELS[label]]), label, rng.choice(names), rng)
            if text not in seen:
                break
        else:  # pragma: no cover - only for absurd n
            raise ValueError(f"cannot draw {n} distinct {split} sentences; ask for fewer")
        seen.add(text)
        out.append((text, label))
    rng.shuffle(out)
    return out


def make_dataset(
    n_train: int = 800, n_test: int = 400, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """Generate the intent task.

    Args:
        n_train: training examples (balanced over the intents).
        n_test: held-out examples, from frames and products never used in training.
        seed: seed of the ``random.Random`` that draws everything (same seed, same data).

    Returns:
        ``(train, test, labels)``: lists of ``(text, label_index)`` and the intent names.
    """
    rng = random.Random(seed)
    train = _generate(n_train, "train", rng)
    test = _generate(n_test, "test", rng)
    return train, test, list(LABELS)


def encode(tokenizer: Any, texts: list[str], max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``texts`` (padded to the longest, truncated to ``max_length``).

    Returns:
        ``(input_ids, attention_mask)``, both int64 of shape ``(len(texts), seq)``.
    """
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]
