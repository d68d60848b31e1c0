"""The argparse parser of ``lora-fx`` (commands live in :mod:`.commands`)."""

from __future__ import annotations

import argparse

from ..examples.model_spec import builtin_names
from . import commands

__all__ = ["build_parser", "EPILOG"]

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
        epilog=EPILOG.format(names=", ".join(builtin_names())))
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
    p.set_defaults(func=commands.cmd_inspect)

    p = sub.add_parser("export", formatter_class=fmt, help="lorafy, load adapter, fold, export ONNX, verify",
                       description="Trace MODEL, lorafy --targets, load --adapter, fold LoRA into the "
                                   "weights, export ONNX and verify it against the base export "
                                   "(structure + ONNX Runtime numerics). Exit 1 if verification fails.",
                       epilog="examples:\n  lora-fx export gpt2 --targets c_attn --adapter out/adapter -o task.onnx\n"
                              "  lora-fx export llama --targets q_proj v_proj --kv-cache -o chat/model.onnx\n"
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
    p.add_argument("--kv-cache", action="store_true",
                   help="a decoder with past/present key-value inputs and outputs, for 'lora-fx generate' and "
                        "ONNX Runtime generation (fold_and_export(..., kv_cache=True); a causal LM MODEL)")
    p.add_argument("--fp16", action="store_true", help="fold in fp32, round once, write fp16")
    p.add_argument("--no-verify", action="store_true", help="skip the base export and comparison")
    p.add_argument("--quantize", choices=["int4", "int8"], help="fold in fp32, then quantize with ONNX Runtime "
                   "(int4: MatMulNBits; int8: dynamic MatMulInteger), prove and report the error")
    p.add_argument("--block-size", type=int, default=None, help="weights per scale for MatMulNBits (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="store per-block zero points")
    p.add_argument("--int8-method", choices=["dynamic", "weight_only"], default=None, help="int8 kind (default dynamic)")
    p.add_argument("--quantize-exclude", nargs="+", metavar="GLOB", help="weights left in fp32 (e.g. 'lm_head.*')")
    p.add_argument("--head-bits", type=int, choices=[4, 8, 32], default=None,
                   help="bits of the output heads (the MatMuls that make a graph output, e.g. lm_head): 8 (default), "
                        "4 (int4: like the rest) or 32 (kept fp32)")
    p.add_argument("--optimize", choices=["on", "off", "ort"], default="on",
                   help="on: weight-independent onnxscript optimization (default); ort: plus ONNX Runtime's "
                        "transformer fusions; off: the exporter's raw graph")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("verify", formatter_class=fmt, help="is TASK the BASE graph with new weights?",
                       description="Compare two ONNX files: exit 0 when they differ only in initializer "
                                   "values, 1 otherwise (the first difference is printed), 2 when a file "
                                   "is missing or not a valid ONNX model.")
    p.add_argument("base", metavar="BASE.onnx")
    p.add_argument("task", metavar="TASK.onnx")
    p.set_defaults(func=commands.cmd_verify)

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
    p.set_defaults(func=commands.cmd_refold)

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
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("generate", formatter_class=fmt, help="generate text from a KV-cache export",
                       description="Greedy (or sampled) generation in ONNX Runtime from a file written by "
                                   "fold_and_export(..., kv_cache=True) or 'lora-fx export MODEL ... --kv-cache'; "
                                   "the tokenizer is read from the file's "
                                   "folder (tokenizer.save_pretrained) or --tokenizer.",
                       epilog="example:\n  lora-fx generate lora_fx_demo_llm/chat.onnx --prompt 'Send 3 Zorblax desk lamps to Riga.'")
    p.add_argument("onnx", metavar="FILE")
    p.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer folder (default: FILE's folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--system", default=None, help="a system message before the prompt (chat template)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=commands.cmd_generate)
    return parser
