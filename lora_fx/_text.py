"""Wording shared by lora-fx's reports and console output."""

from __future__ import annotations

__all__ = ["plural"]


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``n`` and the noun in the right number: ``plural(1, "weight")`` -> ``"1 weight"``,
    ``plural(2, "weight")`` -> ``"2 weights"``, ``plural(3, "proof", "proofs")``; thousands separated."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"
