"""lora_fx._text.plural: counts in reports and console output read '1 site', '2 sites'."""

from lora_fx._text import plural


def test_plural_agrees_with_the_count():
    assert [plural(n, "site") for n in (0, 1, 2)] == ["0 sites", "1 site", "2 sites"]
    assert plural(1, "LoRA pair") == "1 LoRA pair" and plural(1234, "node") == "1,234 nodes"
    assert plural(3, "matrix", "matrices") == "3 matrices" and plural(1, "matrix", "matrices") == "1 matrix"
