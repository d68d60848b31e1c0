"""The ``lora-fx`` command line (also ``python -m lora_fx``).

Commands::

    lora-fx inspect MODEL [--targets P ...] [--rank R]    adaptable sites; what patterns select (dry run)
    lora-fx export  MODEL --targets P ... -o task.onnx    trace, lorafy, load adapter, fold, export, verify
    lora-fx verify  BASE.onnx TASK.onnx                   same graph, only initializer values differ?
    lora-fx demo    [llm] [--quick] [--out DIR]           MiniLM (or SmolLM2) + LoRA, end to end
    lora-fx generate CHAT.onnx --prompt TEXT              text from a KV-cache export (tokenizer beside it)

``MODEL`` is a built-in example name (``lora_fx.examples.zoo_models.MODELS``) or
``package.module:factory``, a callable returning ``(model, args, kwargs)`` (like uvicorn's app spec;
the current directory is importable).

Exit codes: 0 success; 1 a verification failed (``verify`` found a structural difference, or the
file ``export`` wrote failed its check); 2 a usage error or any :class:`lora_fx.LoraFxError`, reported
as one ``lora-fx: error: ...`` message on stderr without a traceback (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import LoraFxError, PatternError, VerifyError

__all__ = ["CliError", "build_parser", "load_model", "main", "parse_targets"]


class CliError(LoraFxError, ValueError):
    """A command-line input is wrong (unknown model, bad file, missing optional package)."""


def describe_builtin(name: str) -> str:
    """First docstring line of a built-in example's factory, marked as random weights."""
    from .examples import zoo_models

    factory = zoo_models.MODELS.get(name) or zoo_models.BENCH_MODELS.get(name)
    first = (factory.__doc__ or name).strip().splitlines()[0].rstrip(".")
    real = " (real pretrained weights)" if name == "minilm" else "; random weights, not a pretrained model"
    return f"{first}{real}"


def _builtin_names() -> list[str]:
    from .examples import zoo_models

    return [*zoo_models.MODELS, *zoo_models.BENCH_MODELS]


EPILOG = """\
MODEL is a built-in example ({names}: small models with RANDOM weights, e.g. gpt2 is a
2-layer GPT2LMHeadModel, not the pretrained gpt2), a Hugging Face config.json,
or package.module:factory, a callable returning (model, args, kwargs) (your pretrained model).

examples:
  lora-fx demo                                   # MiniLM + LoRA text classifier, < 3 min on 2 cores
  lora-fx inspect gpt2                           # every adaptable site
  lora-fx inspect bert --targets '*.query' '*.value' --rank 8
  lora-fx export mypkg.models:make --adapter run/adapter -o task.onnx   # sites from the adapter
  lora-fx export gpt2 --targets c_attn --rank 4 --fp16 -o task.onnx
  lora-fx export mlp --targets fc1 fc2 -o base.onnx   # no adapter: B = 0, so this is the base model
  lora-fx verify base.onnx task.onnx             # exit 0: same graph, only weights differ
  python -m lora_fx --help
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lora-fx", formatter_class=fmt,
        description="LoRA as a graph-rewriting compiler pass: find sites, export folded ONNX, prove it "
                    "is the base graph with new weights.",
        epilog=EPILOG.format(names=", ".join(_builtin_names())))
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    targets_help = ("site patterns: globs ('*.query'), plain names (dotted suffix, PEFT's rule), "
                    "'re:REGEX'; append '@R' for a per-pattern rank ('head@4')")

    p = sub.add_parser("inspect", formatter_class=fmt, help="list adaptable sites; dry-run --targets",
                       description="Trace MODEL and list its adaptable matmul sites. With --targets, mark "
                                   "the sites each pattern selects and count the LoRA parameters "
                                   "(nothing is trained or written).",
                       epilog="examples:\n  lora-fx inspect mlp\n  lora-fx inspect gpt2 --targets c_attn --rank 4\n"
                              "  lora-fx inspect Llama-3-70B/config.json --targets q_proj v_proj --rank 16")
    p.add_argument("model", metavar="MODEL", help="built-in name, package.module:factory, or a Hugging Face "
                   "config.json (or its folder): traced on the meta device, no weights needed")
    p.add_argument("--targets", nargs="+", metavar="PATTERN", help=targets_help)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank, scale 1)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", formatter_class=fmt, help="lorafy, load adapter, fold, export ONNX, verify",
                       description="Trace MODEL, lorafy --targets, load --adapter, fold LoRA into the "
                                   "weights, export ONNX and verify it against the base export "
                                   "(structure + ONNX Runtime numerics). Exit 1 if verification fails.",
                       epilog="examples:\n  lora-fx export gpt2 --targets c_attn --adapter out/adapter -o task.onnx\n"
                              "  lora-fx export mlp --targets fc1 -o base.onnx   # no adapter = base model")
    p.add_argument("model", metavar="MODEL", help="built-in name or package.module:factory")
    p.add_argument("--targets", nargs="+", metavar="PATTERN",
                   help=targets_help + "; optional with --adapter (its config names the sites)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    p.add_argument("--adapter", metavar="DIR", help="adapter folder (adapter_config.json + "
                   "adapter_model.safetensors, PEFT layout) to fold into the weights")
    p.add_argument("-o", "--output", metavar="TASK.onnx", required=True, help="file to write")
    p.add_argument("--unfolded", action="store_true", help="keep the LoRA branches (debugging/serving)")
    p.add_argument("--fp16", action="store_true", help="fold in fp32, round once, write fp16")
    p.add_argument("--no-verify", action="store_true", help="skip the base export and comparison")
    p.add_argument("--quantize", choices=["int4", "int8"], help="fold in fp32, then quantize with ONNX Runtime "
                   "(int4: MatMulNBits; int8: dynamic MatMulInteger), prove and report the error")
    p.add_argument("--block-size", type=int, default=None, help="weights per scale for MatMulNBits (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="store per-block zero points")
    p.add_argument("--int8-method", choices=["dynamic", "weight_only"], default=None, help="int8 kind (default dynamic)")
    p.add_argument("--quantize-exclude", nargs="+", metavar="GLOB", help="weights left in fp32 (e.g. 'lm_head.*')")
    p.add_argument("--optimize", choices=["on", "off", "ort"], default="on",
                   help="on: weight-independent onnxscript optimization (default); ort: plus ONNX Runtime's "
                        "transformer fusions; off: the exporter's raw graph")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", formatter_class=fmt, help="is TASK the BASE graph with new weights?",
                       description="Compare two ONNX files: exit 0 when they differ only in initializer "
                                   "values, 1 otherwise (the first difference is printed), 2 when a file "
                                   "is missing or not a valid ONNX model.")
    p.add_argument("base", metavar="BASE.onnx")
    p.add_argument("task", metavar="TASK.onnx")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("refold", formatter_class=fmt, help="swap the adapter inside a folded export",
                       description="Rewrite only the adapted initializers of an existing folded export "
                                   "with another adapter: no tracing, no export. The base weights come from "
                                   "the base export (--base, exact) or from the adapter folded in TASK (--old). "
                                   "An int4/int8 TASK (export --quantize) takes the fp32 --base export.",
                       epilog="example:\n  lora-fx refold task.onnx --adapter adapters/task2 --base base.onnx -o task2.onnx")
    p.add_argument("task", metavar="TASK.onnx")
    p.add_argument("--adapter", metavar="DIR", required=True, help="the new adapter (PEFT layout)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="file to write (may be TASK)")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", metavar="BASE.onnx", help="export of the base model")
    base.add_argument("--old", metavar="DIR", help="the adapter folded into TASK")
    p.set_defaults(func=cmd_refold)

    p = sub.add_parser("demo", formatter_class=fmt, help="MiniLM + LoRA text classifier, end to end",
                       description="Fine-tune pretrained all-MiniLM-L6-v2 with LoRA (query, value and the "
                                   "classifier head) on a generated intent task, then fold, export, "
                                   "verify and time ONNX Runtime. Needs lora-fx[minilm].",
                       epilog="examples:\n  lora-fx demo\n  lora-fx demo --quick --out /tmp/demo")
    p.add_argument("which", nargs="?", choices=["minilm", "llm"], default="minilm",
                   help="minilm (default) or llm: SmolLM2-135M-Instruct, KV-cache export, ORT generation")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (< ~60 s)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default ./lora_fx_demo[_llm])")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default: min(2, cores - 1), one core left free; 1 on a busy machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init and training (default 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", formatter_class=fmt, help="generate text from a KV-cache export",
                       description="Greedy (or sampled) generation in ONNX Runtime from a file written by "
                                   "fold_and_export(..., kv_cache=True); the tokenizer is read from the file's "
                                   "folder (tokenizer.save_pretrained) or --tokenizer.",
                       epilog="example:\n  lora-fx generate lora_fx_demo_llm/chat.onnx --prompt 'Send 3 Zorblax desk lamps to Riga.'")
    p.add_argument("onnx", metavar="FILE")
    p.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer folder (default: FILE's folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)
    return parser


# --------------------------------------------------------------------------------------------------
# MODEL specs and target patterns
# --------------------------------------------------------------------------------------------------


def load_model(spec: str) -> tuple[Any, tuple, dict]:
    """Resolves ``MODEL``: a built-in example name, or ``package.module:factory`` -> ``(model, args, kwargs)``.

    Raises:
        CliError: unknown name, module that does not import, factory missing or returning another shape.
    """
    from torch import nn

    if spec.endswith(".json") or os.path.isfile(os.path.join(spec, "config.json")):
        from .weights import config_example

        return config_example(spec)  # a Hugging Face config.json: built on meta, no weights read
    if ":" not in spec:
        names = _builtin_names()
        if spec not in names:
            raise CliError(f"unknown model {spec!r}: use a built-in name ({', '.join(names)}) "
                           "or package.module:factory")
        from .examples import zoo_models

        try:
            return zoo_models.build(spec)
        except ImportError as e:
            raise CliError(f"model {spec!r} needs an optional package: {e}") from e
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"model spec {spec!r} must look like package.module:factory")
    if os.getcwd() not in sys.path:  # like uvicorn: modules in the current directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"cannot import module {module_name!r} of model spec {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n)))[:12]
            raise CliError(f"{module_name!r} has no attribute {attr!r}; callables there: {', '.join(public)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec} is a {type(obj).__name__}, not a callable returning (model, args, kwargs)")
    try:
        result = obj()
    except LoraFxError:
        raise
    except Exception as e:
        raise CliError(f"factory {spec} raised {type(e).__name__}: {e}") from e
    if isinstance(result, tuple) and len(result) == 2:
        result = (*result, {})
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], nn.Module)):
        raise CliError(f"factory {spec} must return (model, args, kwargs) with an nn.Module first; "
                       f"got {type(result).__name__}")
    model, args, kwargs = result
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    return model, args, dict(kwargs or {})


def parse_targets(patterns: Sequence[str]) -> list[Any]:
    """Command-line patterns -> lorafy patterns: ``re:REGEX`` is a regex, ``PATTERN@R`` sets the rank."""
    from .targets import Target

    out: list[Any] = []
    for text in patterns:
        rank = None
        m = re.fullmatch(r"(.+)@(\d+)", text)
        if m:
            text, rank = m.group(1), int(m.group(2))
        pattern: Any = text
        if text.startswith("re:"):
            try:
                pattern = re.compile(text[3:])
            except re.error as e:
                raise CliError(f"pattern {text!r}: invalid regular expression ({e})") from e
        out.append(Target(pattern, rank=rank) if rank is not None else pattern)
    return out


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


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


def _trace(spec: str) -> Any:
    import lora_fx

    with _step(f"building {spec}"):
        model, args, kwargs = load_model(spec)
    if spec in _builtin_names():  # say that "gpt2" is a tiny random stand-in, not the pretrained model
        print(f"built-in example {spec!r}: {describe_builtin(spec)}")
    with _step("tracing (torch.export)"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_fx.trace(model, args, kwargs)


def cmd_inspect(ns: argparse.Namespace) -> int:
    """``lora-fx inspect``: the site table, and with --targets what each pattern selects."""
    import lora_fx

    from .targets import as_targets

    gm = _trace(ns.model)
    found = lora_fx.sites(gm)
    targets = as_targets(parse_targets(ns.targets)) if ns.targets else []
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
    print(f"{len(found)} adaptable sites; model parameters {total:,}")
    if lgm is None or report is None:
        print("dry-run a selection with --targets PATTERN ... (e.g. --targets '*.query' '*.value')")
        return 0
    print()
    for k, t in enumerate(targets):
        hits = [s for s in found if t.matches(s)]
        # the first pattern that matches a site sets its rank/alpha (lorafy's rule)
        mine = [b for b in report.branches if next(j for j, u in enumerate(targets) if u.matches(b.site)) == k]
        params = sum(lgm.get_parameter(n).numel() for b in mine for n in (b.a, b.b))
        earlier = len(hits) - len({b.site.id for b in mine})
        note = f" ({earlier} taken by an earlier pattern)" if earlier else ""
        print(f"[{k}] {t.pattern!r}{'' if t.rank is None else f' rank {t.rank}'}: {len(hits)} site(s){note}, "
              f"{params:,} LoRA parameters")
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
            lgm = lora_fx.lorafy(gm, parse_targets(ns.targets), rank=ns.rank, alpha=ns.alpha)
    if ns.adapter:
        try:
            from .adapters import load_adapter
        except ImportError as e:
            raise CliError(f"--adapter needs lora_fx.adapters.load_adapter, which is not available ({e})") from e
        with _step(f"loading adapter {ns.adapter}"):
            lgm = load_adapter(lgm, ns.adapter)  # without --targets it lorafies from the adapter's config
    else:
        print("no --adapter: LoRA B is zero, so the export carries the base weights")
    report = lgm.lora_report
    print(f"LoRA: {len(report.sites)} sites, {report.trainable:,} LoRA parameters on {report.total:,} in all")
    what = "unfolded export" if ns.unfolded else "fold + export"
    with _step(what + ("" if ns.no_verify else " + verify")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = lora_fx.fold_and_export(lgm, ns.output, folded=not ns.unfolded, verify=not ns.no_verify,
                                             dtype=torch.float16 if ns.fp16 else None, quantize=_quantize(ns),
                                             optimize={"on": True, "off": False}.get(ns.optimize, ns.optimize))
        except VerifyError as e:
            print(f"lora-fx: verification failed: {e}", file=sys.stderr)
            return 1
    print(result)
    return 0


def _quantize(ns: argparse.Namespace):
    if not ns.quantize:
        return None
    from .exporters.quantize import as_config

    return as_config(ns.quantize, block_size=ns.block_size, symmetric=False if ns.asymmetric else None,
                     int8_method=ns.int8_method, exclude=tuple(ns.quantize_exclude or ()) or None)


def _check_onnx(path: str) -> None:
    import onnx

    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    try:
        onnx.checker.check_model(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(f"{path} is not a valid ONNX model ({type(e).__name__}: {first})") from e


def cmd_verify(ns: argparse.Namespace) -> int:
    """``lora-fx verify``: exit 0 when TASK is BASE with other initializer values, else 1."""
    import lora_fx

    for path in (ns.base, ns.task):
        _check_onnx(path)
    st = lora_fx.verify_fold(ns.base, ns.task).structure
    print(f"base {ns.base}: {st.base_nodes} nodes")
    print(f"task {ns.task}: {st.task_nodes} nodes")
    if st.ok:
        print(st)
        print("OK: same graph; only initializer values differ")
        return 0
    if st.added_initializers:
        print(f"aliased initializers: {', '.join(st.added_initializers)}")
    print(f"FAILED: first difference: {st.first_difference}")
    return 1


def cmd_refold(ns: argparse.Namespace) -> int:
    """``lora-fx refold``: see :func:`lora_fx.exporters.refold.refold_onnx`."""
    from .exporters.refold import refold_onnx

    _check_onnx(ns.task)
    if ns.base:
        _check_onnx(ns.base)
    with _step(f"refolding {ns.task} with {ns.adapter}"):
        report = refold_onnx(ns.task, ns.adapter, ns.output, base_onnx=ns.base, old_adapter=ns.old)
    print(report)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    """``lora-fx demo``: see :func:`lora_fx.demo.run`."""
    if ns.which == "llm":
        from .demo_llm import run as run_llm

        run_llm(out=ns.out or "lora_fx_demo_llm", quick=ns.quick, threads=ns.threads, seed=ns.seed)
        return 0
    from .demo import run

    run(out=ns.out or "lora_fx_demo", quick=ns.quick, threads=ns.threads, seed=ns.seed)
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    """``lora-fx generate``: see :func:`lora_fx.generation.generate_text`."""
    from .generation import generate_text

    for text in generate_text(ns.onnx, ns.prompt, tokenizer=ns.tokenizer, max_new_tokens=ns.max_new_tokens,
                              chat=not ns.raw, do_sample=ns.sample, temperature=ns.temperature, top_k=ns.top_k,
                              top_p=ns.top_p, seed=ns.seed):
        print(text)
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-fx`` and ``python -m lora_fx``; returns the exit code."""
    _quiet_libraries()
    parser = build_parser()
    ns = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except LoraFxError as e:
        if ns.traceback:
            raise
        print(f"lora-fx: error: {e}", file=sys.stderr)
        if isinstance(e, PatternError) and getattr(ns, "model", None):
            print(f"hint: 'lora-fx inspect {ns.model}' lists every site", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
