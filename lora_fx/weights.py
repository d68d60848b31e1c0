"""Capture without the weights: build on the meta device, load a checkpoint straight into the graph.

A 70B model does not fit in memory twice (nor, often, once). The weights are never needed to trace,
list sites or lorafy, only their shapes::

    with lora_fx.empty_weights():                  # parameters on meta, buffers real (RoPE tables)
        model = AutoModelForCausalLM.from_config(config)
    gm  = lora_fx.trace(model, (ids,))             # seconds per layer, ~no memory
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj"], rank=16)
    lora_fx.load_weights(lgm, "Llama-3-70B/")      # safetensors shards -> the captured module, one
                                                   # tensor at a time; LoRA A/B initialised (B = 0)

The checkpoint keys are the model's ``state_dict`` names, which are the names the captured graph
reads (``model.layers.0.self_attn.q_proj.weight``), so no renaming is needed. Every key, shape and
dtype is checked before any tensor is read; a tensor still on meta afterwards (a non-persistent
buffer of a model built under ``torch.device("meta")``) is an error naming it and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ._text import plural
from .errors import WeightsError

__all__ = ["check_materialized", "checkpoint_files", "config_example", "empty_weights", "from_config",
    "INDEX", "load_weights", "LoadReport", "meta_tensors", "redevice", "SINGLE"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class LoadReport:
    """What :func:`load_weights` read: tensors per file, and what it initialised or skipped."""

    loaded: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    lora_initialised: int = 0
    tied: dict[str, str] = field(default_factory=dict)  # name absent from the checkpoint -> name it shares
    unused: list[str] = field(default_factory=list)  # checkpoint keys the module does not read
    graph_constants: int = 0  # graph nodes whose baked-in device=meta was rewritten

    def __str__(self) -> str:
        return (f"loaded {plural(self.loaded, 'tensor')} ({self.bytes / 2**30:.2f} GiB) from {plural(len(self.files), 'file')}; "
                f"initialised {plural(self.lora_initialised, 'LoRA tensor')} (B = 0); tied {len(self.tied)}; "
                f"unused checkpoint keys {len(self.unused)}")


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Inside, every ``nn.Parameter`` a module registers is created on the meta device; buffers stay real.

    Buffers such as RoPE's ``inv_freq`` are computed in ``__init__`` and are not in checkpoints, so
    they must stay real (``with torch.device("meta")`` would lose them). Parameters cost nothing.
    """
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def from_config(config: str | os.PathLike | object, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A Hugging Face causal LM with every parameter on meta, from a ``config.json`` (file or folder).

    Args:
        config: path of ``config.json``, a folder holding one, or a ``PretrainedConfig``.
        dtype: parameter dtype (default: the config's ``torch_dtype``/``dtype``, else float32).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.exists(path):
            raise WeightsError(f"config {path!r} does not exist; pass a config.json or the folder holding it")
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise WeightsError(f"{path!r}: no config.json there (a Hugging Face model folder has one)")
        config = AutoConfig.from_pretrained(folder)
    config.use_cache = False
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def config_example(config: str | os.PathLike) -> tuple[nn.Module, tuple, dict]:
    """``(model on meta, (ids,), {})`` for ``lora-fx inspect config.json``: token ids of shape (2, 8)."""
    model = from_config(config)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, (ids,), {}


def meta_tensors(module: nn.Module) -> list[str]:
    """Qualified names of the parameters, buffers and tensor constants of ``module`` still on meta."""
    names = [n for n, t in module.named_parameters(remove_duplicate=False) if t.is_meta]
    names += [n for n, t in module.named_buffers(remove_duplicate=False) if t.is_meta]
    if isinstance(module, fx.GraphModule):
        seen = set(names)  # a set: `in names` per node would be nodes x parameters on a meta capture
        for node in module.graph.nodes:
            if node.op == "get_attr" and str(node.target) not in seen:
                seen.add(str(node.target))
                value = _get(module, str(node.target))
                if isinstance(value, torch.Tensor) and value.is_meta:
                    names.append(str(node.target))
    return names


def check_materialized(module: nn.Module, what: str) -> None:
    """Raises WeightsError naming the first tensor of ``module`` on meta, and how to load it."""
    names = meta_tensors(module)
    if names:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise WeightsError(f"{what} needs real weights, but {names[0]!r}{more} is still on the meta device; "
                           "load them first: lora_fx.load_weights(lgm, '<checkpoint folder with "
                           "model.safetensors[.index.json]>')")


def checkpoint_files(folder: str | os.PathLike) -> dict[str, str]:
    """Checkpoint key -> safetensors file, from ``model.safetensors.index.json`` or one ``model.safetensors``."""
    folder = os.fspath(folder)
    index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: no 'weight_map' object (a sharded Hugging Face index has one)")
        missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(folder, v))})
        if missing:
            raise WeightsError(f"{index} names shard(s) that are not in {folder!r}: {missing[:3]}")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    found = sorted(os.listdir(folder))[:8] if os.path.isdir(folder) else "not a folder"
    raise WeightsError(f"{folder!r} has neither {INDEX} nor {SINGLE} (found: {found}); pass a Hugging Face "
                       "checkpoint folder saved with save_pretrained(safe_serialization=True)")


def load_weights(module: nn.Module, folder: str | os.PathLike, *, strict: bool = True,
                 lora_init: str = "kaiming") -> LoadReport:
    """Fills the meta (or real) tensors of a captured / lorafied module from a safetensors checkpoint.

    Each checkpoint tensor is read once and converted to the dtype the module declares (so a bf16
    checkpoint loads into an fp32 capture); tied names (``lm_head.weight`` sharing
    ``embed_tokens.weight``) get the tensor loaded under the other name. LoRA A/B still on meta are
    created and initialised like ``lorafy`` does (A random, B = 0). Peak memory: the module's
    weights plus one tensor.

    Args:
        module: what ``lora_fx.trace`` / ``lorafy`` returned (or any ``nn.Module``).
        folder: holds ``model.safetensors.index.json`` + shards, or one ``model.safetensors``.
        strict: checkpoint keys the module does not read are an error (else listed in the report).
        lora_init: ``"kaiming"`` or ``"gaussian"`` for LoRA A (as ``lorafy(init=...)``).

    Raises:
        WeightsError: a parameter is missing from the checkpoint, a shape differs, a key is unused
            (with ``strict``), or a tensor is still on meta afterwards. Checked before any tensor
            is replaced.
    """
    files = checkpoint_files(folder)
    slots = _slots(module)  # name -> (owner module, attr, is_param, current tensor)
    lora = _lora_names(module)
    groups: dict[int, list[str]] = {}
    for name, (_, _, _, t) in slots.items():
        groups.setdefault(id(t), []).append(name)
    report = LoadReport(files=sorted(set(files.values())))
    plan: dict[str, str] = {}  # checkpoint key -> module name
    for names in groups.values():
        present = [n for n in names if n in files]
        if present:
            plan[present[0]] = present[0]
            report.tied.update({n: present[0] for n in names if n not in files})
    report.unused = sorted(k for k in files if k not in slots)
    _check_plan(module, slots, groups, plan, files, lora, report, strict, folder)
    for _, f, key in _open_by_file(plan, files):
        old = slots[key][3]
        value = f.get_tensor(key).to(dtype=old.dtype, device="cpu" if old.is_meta else old.device)
        _replace(slots, groups[id(old)], value)
        report.loaded += 1
        report.bytes += value.numel() * value.element_size()
    report.lora_initialised = _init_lora(module, slots, groups, lora, lora_init)
    check_materialized(module, "load_weights")
    if isinstance(module, fx.GraphModule):
        devices = {t.device for _, _, _, t in slots.values()}
        report.graph_constants = redevice(module, devices.pop() if len(devices) == 1 else torch.device("cpu"))
    return report


def redevice(gm: fx.GraphModule, device: torch.device, old: torch.device | str = "meta") -> int:
    """Rewrites the ``device=meta`` a meta capture baked into the graph (``arange(n, device=meta)``,
    ``to(x, meta)``, metadata asserts) to ``device`` (or another ``old`` device: the streamed
    export moves a CPU capture to meta); returns how many nodes changed.

    ``lorafy``'s record of the captured graph is rewritten alike, so ``fold`` still proves that the
    folded graph is the captured one (and generates its code: the captured code names the old device).
    """
    from .graph_module import GeneratedCode, has_lora, lora_state

    meta = torch.device(old)

    def swap(a):
        if isinstance(a, torch.device) and a == meta:
            return device
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        if isinstance(a, dict):
            return {k: swap(v) for k, v in a.items()}
        return a

    changed = 0
    for node in gm.graph.nodes:
        args, kwargs = swap(node.args), swap(node.kwargs)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
        if has_lora(gm):
            state = lora_state(gm, "materialize")
            old, new = repr(meta), repr(device)
            state.base_signature[:] = [line.replace(old, new) for line in state.base_signature]
            state.base_code = GeneratedCode()  # the captured code names the old device: fold generates anew
    return changed


def _get(root: nn.Module, qualname: str):
    obj = root
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, bool, torch.Tensor]]:
    out = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for attr, t in store.items():
                if t is not None:
                    out.setdefault(prefix + attr, (mod, attr, is_param, t))
    if isinstance(module, fx.GraphModule):  # tensor constants read by get_attr
        for node in module.graph.nodes:
            name = str(node.target)
            if node.op == "get_attr" and name not in out:
                value = _get(module, name)
                if isinstance(value, torch.Tensor):
                    owner, _, attr = name.rpartition(".")
                    out[name] = (module.get_submodule(owner) if owner else module, attr, False, value)
    return out


def _lora_names(module: nn.Module) -> set[str]:
    from .graph_module import has_lora, lora_state

    if not has_lora(module):
        return set()
    return {n for br in lora_state(module, "load weights").branches for n in (br.a, br.b)}


def _check_plan(module, slots, groups, plan, files, lora, report, strict, folder) -> None:
    covered = {n for key in plan for n in groups[id(slots[key][3])]}
    missing = [n for n, (_, _, is_param, t) in slots.items()
               if n not in covered and n not in lora and (is_param or t.is_meta)]
    if missing:
        raise WeightsError(f"checkpoint {os.fspath(folder)!r} has no tensor for {missing[0]!r} ({len(missing)} "
                           f"missing in all{'; ' + repr(missing[1:4]) if len(missing) > 1 else ''}); is it the "
                           "checkpoint of this model? (a buffer computed in __init__, like RoPE's inv_freq, "
                           "stays real when the model is built under lora_fx.empty_weights())")
    if strict and report.unused:
        raise WeightsError(f"checkpoint keys the module does not read: {report.unused[:3]} ({len(report.unused)} "
                           "in all); pass strict=False to ignore them")
    for path, f, key in _open_by_file(plan, files):
        shape = tuple(f.get_slice(key).get_shape())
        want = tuple(slots[key][3].shape)
        if shape != want:
            raise WeightsError(f"{key}: checkpoint {os.path.basename(path)} has shape {shape}, the "
                               f"module expects {want}; nothing was loaded")


def _open_by_file(plan, files):
    """Yields ``(path, open safetensors file, key)`` for each planned key, opening each file once."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for key in plan:
        by_file.setdefault(files[key], []).append(key)
    for path, keys in by_file.items():
        with safe_open(path, framework="pt") as f:
            for key in keys:
                yield path, f, key


def _replace(slots, names: list[str], value: torch.Tensor) -> None:
    """Puts ``value`` under every name that shared the old tensor (tied weights stay tied)."""
    new_param = None
    for name in names:
        owner, attr, is_param, old = slots[name]
        if is_param:
            if new_param is None:
                new_param = nn.Parameter(value, requires_grad=old.requires_grad)
            owner._parameters[attr] = new_param
            slots[name] = (owner, attr, True, new_param)
        elif attr in owner._buffers:
            owner._buffers[attr] = value
            slots[name] = (owner, attr, False, value)
        else:
            setattr(owner, attr, value)
            slots[name] = (owner, attr, False, value)


def _init_lora(module, slots, groups, lora: set[str], init: str) -> int:
    from . import kinds
    from .graph_module import lora_state

    if not lora:
        return 0
    count = 0
    for br in lora_state(module, "load weights").branches:
        a, b = slots[br.a][3], slots[br.b][3]
        if not (a.is_meta or b.is_meta):
            continue
        device = slots[br.site.weight][3].device if br.site.weight in slots else torch.device("cpu")
        new_a = torch.empty(a.shape, dtype=a.dtype, device=device)
        new_b = torch.empty(b.shape, dtype=b.dtype, device=device)
        kinds.get(br.site.kind).init_pair(new_a, new_b, init)
        _replace(slots, groups[id(a)], new_a)
        _replace(slots, groups[id(b)], new_b)
        count += 2
    return count
