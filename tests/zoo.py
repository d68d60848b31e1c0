"""The test zoo: every small example model with the sites a test should adapt, and ``assert_close``.

Tests parametrise over :data:`ZOO` (``@pytest.mark.parametrize("case", zoo_params())``) so that every
invariant (B=0 changes nothing, fold(lorafy(m)) == lorafy(m), folded export == base export) holds on
every model: plain ``nn.Linear``, raw parameters used functionally, convolutions with batch norm,
tied embeddings, fused ``nn.MultiheadAttention`` projections, GPT-2 ``Conv1D`` (``aten.addmm``),
BERT, Llama and the real pretrained MiniLM.

``targets`` are glob patterns over a site's module path (the last entry of
``node.meta["nn_module_stack"]`` in the ``torch.export`` graph) or its weight's qualified name.
``n_sites`` is how many sites those patterns select in the export graph (counted by hand from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

from lora_fx.examples import zoo_models

Example = tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class ZooCase:
    """One zoo model.

    Attributes:
        name: test id.
        build: factory returning ``(model, args, kwargs)`` (model in eval mode, batch 2).
        targets: glob patterns selecting the sites to adapt.
        slow: mark the case ``slow`` (deselected by default).
        n_sites: number of sites ``targets`` select in the export graph.
        notes: what the case exercises.
    """

    name: str
    build: Callable[[], Example]
    targets: list[str]
    slow: bool = False
    n_sites: int | None = None
    notes: str = field(default="", compare=False)


ZOO: list[ZooCase] = [
    ZooCase("mlp", zoo_models.mlp, ["fc1", "fc2", "head"], n_sites=3, notes="nn.Linear -> aten.linear"),
    ZooCase(
        "functional",
        zoo_models.functional,
        ["blocks.*.w_in", "blocks.*.w_mid", "blocks.*.w_out"],
        n_sites=6,
        notes="raw parameters: F.linear, numpy_T + matmul, einsum; one module owns three weights",
    ),
    ZooCase(
        "convnet",
        zoo_models.convnet,
        ["conv1", "conv2", "seq_conv", "head"],
        n_sites=4,
        notes="conv2d (stride 2) followed by batch norm, conv1d, linear",
    ),
    ZooCase(
        "tied_lm",
        zoo_models.tied_lm,
        ["block1", "block2", "lm_head"],
        n_sites=3,
        notes="lm_head.weight is embed.weight: adapting lm_head must leave the embedding unchanged",
    ),
    ZooCase(
        "mha",
        zoo_models.mha,
        ["attn.in_proj_weight", "attn.out_proj.weight", "out"],
        n_sites=3,
        notes="nn.MultiheadAttention: fused in_proj and out_proj both sit under module path 'attn'",
    ),
    ZooCase(
        "gpt2",
        zoo_models.gpt2,
        ["*.c_attn", "*.c_proj"],
        n_sites=6,
        notes="GPT-2 Conv1D -> aten.addmm with weight [in, out]; c_proj in attn and mlp",
    ),
    ZooCase("bert", zoo_models.bert, ["*.query", "*.value"], n_sites=4, notes="attention_mask kwarg"),
    ZooCase(
        "llama",
        zoo_models.llama,
        ["*.q_proj", "*.v_proj", "*.down_proj"],
        n_sites=6,
        notes="bias-free linears, grouped-query attention",
    ),
    ZooCase(
        "minilm",
        zoo_models.minilm,
        ["*.query", "*.value"],
        n_sites=12,
        notes="real pretrained all-MiniLM-L6-v2 (offline), mean-pooled output, ~0.5 s to load",
    ),
    ZooCase(
        "gpt2_small_sized",
        zoo_models.gpt2_small_sized,
        ["*.c_attn"],
        slow=True,
        n_sites=12,
        notes="124M-parameter GPT-2 small, random weights",
    ),
]
"""All zoo cases; the ``slow`` ones are deselected by the default ``-m 'not slow'``."""

ZOO_BY_NAME: dict[str, ZooCase] = {case.name: case for case in ZOO}


def zoo_params(names: Iterable[str] | None = None, *, include_slow: bool = True) -> list[Any]:
    """``pytest.param`` objects (id = case name, ``slow`` mark where needed) for ``parametrize``.

    Args:
        names: only these cases (unknown names raise ``KeyError`` listing the known ones).
        include_slow: keep the slow cases (they are still deselected unless ``-m slow``).
    """
    if names is None:
        cases = ZOO
    else:
        unknown = [n for n in names if n not in ZOO_BY_NAME]
        if unknown:
            raise KeyError(f"unknown zoo case(s) {unknown}; known: {', '.join(ZOO_BY_NAME)}")
        cases = [ZOO_BY_NAME[n] for n in names]
    return [
        pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.slow else [])
        for case in cases
        if include_slow or not case.slow
    ]


# --------------------------------------------------------------------------------------------------
# Numerical comparison
# --------------------------------------------------------------------------------------------------

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
"""``dtype -> (rtol, atol)``: the one place tests get numeric tolerances from."""


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; exact ``(0, 0)`` for integer and bool dtypes."""
    if dtype in TOLERANCES:
        return TOLERANCES[dtype]
    if dtype.is_floating_point or dtype.is_complex:
        raise KeyError(f"no tolerance for {dtype}; known: {', '.join(map(str, TOLERANCES))}")
    return 0.0, 0.0


def _normalise(tree: Any) -> Any:
    # Lists and tuples compare alike (ONNX Runtime returns lists), numpy leaves become tensors, plain
    # dicts are key-sorted so that insertion order does not matter.
    if isinstance(tree, np.ndarray | np.generic):
        return torch.from_numpy(np.asarray(tree))
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return tuple(_normalise(x) for x in tree)
    if type(tree) is dict:
        return {k: _normalise(tree[k]) for k in sorted(tree, key=str)}
    if isinstance(tree, Mapping):  # ModelOutput and friends: keep their field order and type
        return type(tree)(**{k: _normalise(v) for k, v in tree.items()})
    return tree


def _least_precise(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return max(a, b, key=lambda d: tolerance(d)[0] if d.is_floating_point else -1.0)


def assert_close(actual: Any, expected: Any, *, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Assert two outputs are numerically equal within the tolerance of their dtype.

    Works on tensors, numpy arrays, numbers and nested tuples/lists/dicts/``ModelOutput``
    (flattened with ``torch.utils._pytree``). Containers may differ in type (e.g. ONNX Runtime's
    list of arrays against a ``ModelOutput``) as long as the leaves line up one to one.

    Args:
        actual: computed output.
        expected: reference output.
        dtype: use this dtype's tolerance for every leaf and allow the leaf dtypes to differ
            (e.g. a bf16 model against an fp32 reference). Default: each leaf's own dtype (the less
            precise of the pair), and the dtypes must match.
        msg: prefix for the failure message.
    """
    a_leaves, a_spec = pytree.tree_flatten_with_path(_normalise(actual))
    e_leaves, e_spec = pytree.tree_flatten_with_path(_normalise(expected))
    prefix = f"{msg}: " if msg else ""
    if len(a_leaves) != len(e_leaves):
        raise AssertionError(
            f"{prefix}structure differs: actual has {len(a_leaves)} leaves, expected {len(e_leaves)}\n"
            f"actual:   {a_spec}\nexpected: {e_spec}"
        )
    for (_, a), (path, e) in zip(a_leaves, e_leaves, strict=True):
        where = f"{prefix}output{pytree.keystr(path)}"
        if not isinstance(e, torch.Tensor) and not isinstance(a, torch.Tensor):
            if isinstance(e, float) and isinstance(a, float | int):
                rtol, atol = tolerance(dtype or torch.float64)
                if not math.isclose(a, e, rel_tol=rtol, abs_tol=atol):
                    raise AssertionError(f"{where}: {a!r} != {e!r} (rtol={rtol}, atol={atol})")
            elif a != e:
                raise AssertionError(f"{where}: {a!r} != {e!r}")
            continue
        a_t, e_t = torch.as_tensor(a).detach().cpu(), torch.as_tensor(e).detach().cpu()
        if dtype is None and a_t.dtype != e_t.dtype:
            raise AssertionError(
                f"{where}: dtype {a_t.dtype} != expected {e_t.dtype} (pass dtype= to compare across dtypes)"
            )
        tol_dtype = dtype or _least_precise(a_t.dtype, e_t.dtype)
        rtol, atol = tolerance(tol_dtype)
        if a_t.dtype != e_t.dtype:
            common = torch.promote_types(a_t.dtype, e_t.dtype)
            a_t, e_t = a_t.to(common), e_t.to(common)
        try:
            torch.testing.assert_close(a_t, e_t, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as err:
            raise AssertionError(f"{where} ({tol_dtype}: rtol={rtol}, atol={atol}): {err}") from None
