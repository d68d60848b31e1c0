"""A generated chat task a pretrained LLM cannot do without fine-tuning: order messages -> order codes.

A fictional shop sells products whose catalogue codes the model has never seen. Each example is a
customer message and the one line a back-office system expects::

    user:      Hi! Could you ship 3 of the Zorblax desk lamps to Oslo, please?
    assistant: ZBX-LMP x3 -> Oslo

The answer needs the catalogue (learnt from the training split: every product appears there), the
quantity and the city (copied from the message) in an exact format nobody states in the prompt. The
held-out split uses sentence frames and cities that never occur in training, so exact match there
measures what was learnt, not memorised messages.
"""

from __future__ import annotations

import random

__all__ = ["CATALOGUE", "make_dataset", "answer"]

CATALOGUE = {
    "Zorblax desk lamp": "ZBX-LMP", "Quillon fountain pen": "QLN-PEN", "Marrowind backpack": "MRW-BAG",
    "Tessaline teapot": "TSL-POT", "Vorpal kitchen knife": "VRP-KNF", "Ombrix umbrella": "OMB-UMB",
    "Hexley wall clock": "HXL-CLK", "Fennick travel mug": "FNK-MUG", "Gryphel notebook": "GRY-NTB",
    "Lunaro bike light": "LNR-LGT", "Brisca yoga mat": "BRS-MAT", "Calderon frying pan": "CLD-PAN",
}

_TRAIN_CITIES = ["Oslo", "Lyon", "Porto", "Graz", "Leeds", "Turin", "Malmo", "Ghent", "Bergen", "Krakow",
                 "Aarhus", "Bilbao", "Dresden", "Utrecht", "Tampere", "Brno"]
_TEST_CITIES = ["Riga", "Split", "Basel", "Cork", "Lille", "Varna", "Pisa", "Tartu"]

_TRAIN_FRAMES = [
    "Hi! Could you ship {n} of the {p}s to {c}, please?",
    "Please send {n} {p}s to {c}.",
    "I'd like to order {n} x {p} for delivery in {c}.",
    "We need {n} units of the {p} in {c} by Friday.",
    "Order: {p}, quantity {n}, destination {c}.",
    "Can I get {n} {p}s delivered to our office in {c}?",
    "Ship {n} pieces of {p} to {c} asap.",
    "Hello, my shop in {c} wants {n} {p}s.",
]
_TEST_FRAMES = [
    "Good morning, please deliver {n} {p}s to {c}.",
    "Our team in {c} requests {n} of your {p}s.",
    "Send {c} {n} {p}s, thanks!",
    "Could {n} {p}s be shipped to {c}?",
]


def answer(product: str, n: int, city: str) -> str:
    """The exact line the back office expects."""
    return f"{CATALOGUE[product]} x{n} -> {city}"


def _examples(k: int, frames: list[str], cities: list[str], rng: random.Random) -> list[tuple[str, str]]:
    products = list(CATALOGUE)
    out = []
    for i in range(k):
        product = products[i % len(products)]  # every product in every split
        n, city = rng.randint(1, 40), rng.choice(cities)
        out.append((rng.choice(frames).format(n=n, p=product, c=city), answer(product, n, city)))
    rng.shuffle(out)
    return out


def make_dataset(n_train: int, n_test: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, test)`` lists of ``(message, answer)``; test frames and cities are unseen in train."""
    rng = random.Random(seed)
    return (_examples(n_train, _TRAIN_FRAMES, _TRAIN_CITIES, rng),
            _examples(n_test, _TEST_FRAMES, _TEST_CITIES, rng))
