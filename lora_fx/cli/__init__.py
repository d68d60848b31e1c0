"""The ``lora-fx`` command line (also ``python -m lora_fx``).

Commands::

    lora-fx inspect MODEL [--targets P ...] [--rank R]    adaptable sites; what patterns select (dry run)
    lora-fx export  MODEL --targets P ... -o task.onnx    trace, lorafy, load adapter, fold, export, verify
    lora-fx verify  BASE.onnx TASK.onnx                   same graph, only initializer values differ?
    lora-fx refold  TASK.onnx --adapter DIR -o OUT.onnx   swap the adapter inside a folded export
    lora-fx demo    [llm] [--quick] [--out DIR]           MiniLM (or SmolLM2) + LoRA, end to end
    lora-fx generate CHAT.onnx --prompt TEXT              text from a KV-cache export (tokenizer beside it)

``MODEL`` is a built-in example name or ``package.module:factory``
(:mod:`lora_fx.examples.model_spec`). The parser is in :mod:`.parser`, the commands in
:mod:`.commands`; a new command is a ``cmd_<name>`` there plus its sub-parser.

Exit codes: 0 success; 1 a verification failed (``verify`` found a structural difference, or the
file ``export`` wrote failed its check); 2 a usage error or any :class:`lora_fx.LoraFxError`, reported
as one ``lora-fx: error: ...`` message on stderr without a traceback (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import LoraFxError, PatternError
from ..examples.model_spec import load_model
from ..targets import parse_patterns
from .commands import CliError
from .parser import build_parser

__all__ = ["CliError", "build_parser", "load_model", "main", "parse_patterns"]


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _for_the_command_line(message: str, ns: argparse.Namespace) -> str:
    """A library error's pointer to Python (``lora_fx.sites(gm)``) becomes the command that does the same."""
    model = getattr(ns, "model", None)
    return message.replace("lora_fx.sites(gm)", f"'lora-fx inspect {model}'" if model else "'lora-fx inspect MODEL'")


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
        message = _for_the_command_line(str(e), ns)
        print(f"lora-fx: error: {message}", file=sys.stderr)
        if isinstance(e, PatternError) and getattr(ns, "model", None) and "lora-fx inspect" not in message:
            print(f"hint: 'lora-fx inspect {ns.model}' lists every site", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
