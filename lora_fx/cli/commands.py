"""The ``lora-fx`` commands: each takes the parsed arguments and returns the exit code."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .._text import plural
from ..errors import LoraFxError, VerifyError
from ..examples.model_spec import builtin_names, describe_builtin, load_model
from ..targets import parse_patterns, site_patterns

__all__ = ["CliError", "cmd_demo", "cmd_export", "cmd_generate", "cmd_inspect", "cmd_refold", "cmd_verify"]


class CliError(LoraFxError, ValueError):
    """A command-line input is wrong (bad file, missing folder, missing optional package)."""


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Prints ``what ...`` and the seconds it took to stderr (progress of the long steps)."""
    print(f"{what} ...", end="", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr)
        raise
    print(f" {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)


def _trace(spec: str, *, sites_only: bool = False) -> Any:
    """Builds and traces MODEL; ``sites_only`` (inspect): one static-shape capture, no train-mode one,
    which is all listing sites and budgets needs (a 70B config.json: ~3x faster)."""
    import lora_fx

    with _step(f"building {spec}"):
        model, args, kwargs = load_model(spec)
    if spec in builtin_names():  # say that "gpt2" is a tiny random stand-in, not the pretrained model
        print(f"built-in example {spec!r}: {describe_builtin(spec)}")
    how = dict(dynamic=False, train_capture=False) if sites_only else {}
    with _step("tracing (torch.export)"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_fx.trace(model, args, kwargs, **how)


def cmd_inspect(ns: argparse.Namespace) -> int:
    """``lora-fx inspect``: the site table, and with --targets what each pattern selects."""
    import lora_fx

    from ..targets import as_targets

    gm = _trace(ns.model, sites_only=True)
    found = lora_fx.sites(gm)
    targets = as_targets(parse_patterns(ns.targets)) if ns.targets else []
    lgm = lora_fx.lorafy(gm, targets, rank=ns.rank, alpha=ns.alpha) if targets else None
    report = lgm.lora_report if lgm is not None else None
    chosen = {s.id for s in report.sites} if report else set()
    width = max([len("site"), *(len(s.id) for s in found)])
    head = f"{'#':>3}  {'site':<{width}}  {'op':<10} {'weight':<16} {'params':>10}"
    print(head + ("  selected by" if targets else ""))
    for i, s in enumerate(found):
        shape = "x".join(map(str, s.shape))
        line = f"{i:>3}  {s.id:<{width}}  {s.op:<10} {shape:<16} {s.params:>10,}"
        if targets:
            by = [f"[{k}]" for k, t in enumerate(targets) if t.matches(s)]
            line += ("  * " if s.id in chosen else "    ") + " ".join(by)
        print(line)
    total = sum(p.numel() for p in gm.parameters())
    print(f"{plural(len(found), 'adaptable site')}; model parameters {total:,}")
    if lgm is None or report is None:
        if found:  # names that select sites of this model (a plain name matches as a dotted suffix)
            print(f"dry-run a selection with --targets PATTERN ..., e.g. --targets {' '.join(site_patterns(found, n=2))}")
        return 0
    print()
    for k, t in enumerate(targets):
        hits = [s for s in found if t.matches(s)]
        # the first pattern that matches a site sets its rank/alpha (lorafy's rule)
        mine = [b for b in report.branches if next(j for j, u in enumerate(targets) if u.matches(b.site)) == k]
        params = sum(lgm.get_parameter(n).numel() for b in mine for n in (b.a, b.b))
        earlier = len(hits) - len({b.site.id for b in mine})
        note = f" ({earlier} taken by an earlier pattern)" if earlier else ""
        print(f"[{k}] {t.pattern!r}{'' if t.rank is None else f' rank {t.rank}'}: {plural(len(hits), 'site')}{note}, "
              f"{plural(params, 'LoRA parameter')}")
    print()
    print(report)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    """``lora-fx export``: trace, lorafy, load adapter, fold, export, verify; prints the report."""
    import torch

    import lora_fx

    if not ns.output.endswith(".onnx"):
        raise CliError(f"-o {ns.output!r}: the output file must end in .onnx")
    if not ns.targets and not ns.adapter:
        raise CliError("export needs --targets PATTERN ... (and usually --adapter DIR); see lora-fx export --help")
    if ns.adapter and not os.path.isdir(ns.adapter):
        raise CliError(f"--adapter {ns.adapter}: no such folder (expected adapter_config.json + "
                       "adapter_model.safetensors)")
    lgm = gm = _trace(ns.model)
    if ns.targets:
        with _step(f"lorafy (rank {ns.rank})"):
            lgm = lora_fx.lorafy(gm, parse_patterns(ns.targets), rank=ns.rank, alpha=ns.alpha)
    if ns.adapter:
        try:
            from ..adapters import load_adapter
        except ImportError as e:
            raise CliError(f"--adapter needs lora_fx.adapters.load_adapter, which is not available ({e})") from e
        with _step(f"loading adapter {ns.adapter}"):
            lgm = load_adapter(lgm, ns.adapter)  # without --targets it lorafies from the adapter's config
    else:
        print("no --adapter: the adapter is all zero (B = 0), so the file equals the base model's export")
    report = lgm.lora_report
    print(f"LoRA: {plural(len(report.sites), 'site')}, {plural(report.trainable, 'LoRA parameter')} "
          f"on {report.total:,} in all")
    what = ("unfolded export" if ns.unfolded else "fold + export") + (" with KV cache" if ns.kv_cache else "")
    with _step(what + ("" if ns.no_verify else " + verify")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = lora_fx.fold_and_export(lgm, ns.output, folded=not ns.unfolded, verify=not ns.no_verify,
                                             dtype=torch.float16 if ns.fp16 else None, quantize=_quantize(ns),
                                             optimize={"on": True, "off": False}.get(ns.optimize, ns.optimize),
                                             kv_cache=ns.kv_cache)
        except VerifyError as e:
            print(f"lora-fx: verification failed: {e}", file=sys.stderr)
            return 1
    print(result)
    return 0


def _quantize(ns: argparse.Namespace):
    if not ns.quantize:
        return None
    from ..exporters.quantize import as_config

    return as_config(ns.quantize, block_size=ns.block_size, symmetric=False if ns.asymmetric else None,
                     int8_method=ns.int8_method, exclude=tuple(ns.quantize_exclude or ()) or None,
                     head_bits=ns.head_bits)


def _check_onnx(path: str) -> None:
    from ..exporters import files as onnx_files

    onnx_files.check(path, error=CliError)


def cmd_verify(ns: argparse.Namespace) -> int:
    """``lora-fx verify``: exit 0 when TASK is BASE with other initializer values, else 1."""
    import lora_fx

    for path in (ns.base, ns.task):
        _check_onnx(path)
    st = lora_fx.verify_fold(ns.base, ns.task).structure
    print(f"base {ns.base}: {plural(st.base_nodes, 'node')}")
    print(f"task {ns.task}: {plural(st.task_nodes, 'node')}")
    if st.ok:
        print(st)
        print("OK: same graph; only initializer values differ")
        return 0
    if st.added_initializers:
        print(f"aliased initializers: {', '.join(st.added_initializers)}")
    extra = st.task_nodes - st.base_nodes
    branches = _lora_initializers(ns.task)
    if branches or extra > 0:
        print(f"task looks unfolded ({plural(extra, 'extra node')}"
              + (f", LoRA initializers {', '.join(branches[:4])}{' ...' if len(branches) > 4 else ''}" if branches else "")
              + "): export it folded (without --unfolded, or fold_and_export(..., folded=True)) to compare")
    elif extra < 0:
        print(f"task has {plural(-extra, 'node')} fewer than base: not an export of the same model and settings")
    print(f"FAILED: first difference: {st.first_difference}")
    return 1


def _lora_initializers(path: str) -> list[str]:
    """Names of an ONNX file's initializers that are LoRA A/B matrices (an unfolded export keeps them)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return [i.name for i in graph.initializer if ".lora_A." in i.name or ".lora_B." in i.name]


def cmd_refold(ns: argparse.Namespace) -> int:
    """``lora-fx refold``: see :func:`lora_fx.switching.refold_onnx`."""
    from ..switching import refold_onnx

    _check_onnx(ns.task)
    if ns.base:
        _check_onnx(ns.base)
    with _step(f"refolding {ns.task} with {ns.adapter}"):
        report = refold_onnx(ns.task, ns.adapter, ns.output, base_onnx=ns.base, old_adapter=ns.old)
    print(report)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    """``lora-fx demo``: see :func:`lora_fx.demos.minilm.run` and :func:`lora_fx.demos.llm.run`."""
    if ns.which == "llm":
        from ..demos.llm import run as run_llm

        run_llm(out=ns.out or "lora_fx_demo_llm", quick=ns.quick, threads=ns.threads, seed=ns.seed)
        return 0
    from ..demos.minilm import run

    run(out=ns.out or "lora_fx_demo", quick=ns.quick, threads=ns.threads, seed=ns.seed)
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    """``lora-fx generate``: see :func:`lora_fx.generation.generate_text`."""
    from ..generation import generate_text

    for text in generate_text(ns.onnx, ns.prompt, tokenizer=ns.tokenizer, max_new_tokens=ns.max_new_tokens,
                              chat=not ns.raw, system=ns.system, do_sample=ns.sample, temperature=ns.temperature, top_k=ns.top_k,
                              top_p=ns.top_p, seed=ns.seed):
        print(text)
    return 0
