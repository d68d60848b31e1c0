"""LoRA adapters on disk, in PEFT's layout, so that PEFT and lora-fx read each other's files.

An adapter is a folder with two files::

    adapter_config.json         PEFT's LoraConfig fields + a "lora_fx" section (below)
    adapter_model.safetensors   the A/B tensors

Tensor names (``<key>`` is a branch key, e.g. ``transformer.h.0.attn.c_attn``)::

    base_model.model.<key>.lora_A.weight   (r, in[, kh, kw])   nn.Linear, GPT-2 Conv1D, convolutions
    base_model.model.<key>.lora_B.weight   (out, r[, 1, 1])    (exactly what PEFT's save_pretrained writes)
    base_model.model.<key>.lora_embedding_A / lora_embedding_B  nn.Embedding (PEFT's names)
    base_model.model.<key>.lora_magnitude_vector (out,)        DoRA's m (``use_dora``; lora_fx.<key>.… too)
    lora_fx.<key>.lora_A.weight / lora_fx.<key>.lora_B.weight  what PEFT cannot express: slices of a
        fused weight (``<key>`` ends in ``_slice<start>_<stop>``), raw parameters used by functional
        ops, extra calls of one module, einsum/matmul sites. PEFT ignores these keys (it loads the
        rest and warns that it ignores the ``lora_fx`` config field).

The config holds what PEFT reads (``peft_type`` "LORA", ``r``, ``lora_alpha``, ``target_modules``:
the full module keys PEFT can adapt, ``rank_pattern`` / ``alpha_pattern`` for modules whose rank or
alpha differ from ``r`` / ``lora_alpha``, ``fan_in_fan_out`` (True when a target is GPT-2's Conv1D,
an ``aten.addmm`` site with layout "in,out"), ``use_rslora``, ``lora_dropout``, ``bias`` "none") and::

    "lora_fx": {"format": 1,
                "sha256": "<hex digest of adapter_model.safetensors>",
                "branches": [{"key", "site", "path", "weight", "op", "layout", "rank", "alpha", "scale",
                              "dropout", "slice": [start, stop] | null, "peft": bool}, ...]}

The delta of a branch is ``scale * B @ A`` (``scale = alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA), added to the rows ``slice`` of the weight's output (all rows when null). Files without the
section (written by PEFT) get their scales from ``r`` / ``lora_alpha`` and the patterns.

Reading never unpickles (safetensors only), checks every key, shape and value (NaN/inf) before
anything is changed, and turns any failure (corrupt or truncated file, config/tensor mismatch) into
:class:`~lora_fx.errors.AdapterError` naming the file. Names read from files never become paths.
Loading into a graph is :mod:`.bind`; task switching lives in :mod:`lora_fx.switching`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import fx

from .. import kinds
from .._atomic import write_files_atomically
from ..delta import Branch
from ..errors import AdapterError
from ..kinds import IN_OUT
from ..sites import Site
from .adapter import Adapter, adapter_of

__all__ = ["CONFIG", "file_keys", "FORMAT", "read_adapter", "save_adapter", "site_ref", "TENSORS"]

CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"
FORMAT = 1
_PEFT_PREFIX = "base_model.model."
_FX_PREFIX = "lora_fx."
_KEY_RE = re.compile(r"(base_model\.model|lora_fx)\.(.+)\.(lora_A\.weight|lora_B\.weight|"
                     r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector)")
_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, PEFT's name (its state dict drops ".weight")
# LoraConfig fields that change what the tensors mean, and what lora-fx says about each
_UNSUPPORTED = {"lora_bias": "LoRA bias terms (lora_bias)", "use_qalora": "QA-LoRA (use_qalora)",
                "layer_replication": "layer replication", "target_parameters": "target_parameters (MoE experts)",
                "alora_invocation_tokens": "aLoRA (activated LoRA)", "arrow_config": "Arrow routing",
                "use_bdlora": "BD-LoRA", "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA",
                "kasa_config": "KaSA", "megatron_config": "Megatron layers", "trainable_token_indices":
                "trainable token indices"}
# init_lora_weights values whose tensors need nothing but W: plain starts, or PiSSA / OLoRA (residual base)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def save_adapter(lgm: fx.GraphModule | Adapter, path: str | os.PathLike) -> Path:
    """Writes the adapter of a lorafied module (or an :class:`Adapter`) to the folder ``path``.

    Both files are written to temporary files inside ``path`` and moved into place with
    ``os.replace``; on failure the previous adapter in ``path`` is left as it was.

    Returns:
        The folder.
    """
    adapter = lgm if isinstance(lgm, Adapter) else adapter_of(lgm)
    batched = [k for k, br in adapter.branches.items() if kinds.get(br.site.kind).batched]
    if batched:  # before anything is written: a file read_adapter could not read back helps nobody
        raise AdapterError(f"{batched[0]} (and {len(batched) - 1} more) are per-expert MoE branches "
                           "(A (E, r, in), B (E, out, r)); adapter files do not hold them yet (PEFT's "
                           "target_parameters layout is not implemented). Keep the lorafied module, or "
                           "fold / fold_and_export it")
    dora = {br.magnitude is not None for key, br in adapter.branches.items() if key in adapter.peft}
    if len(dora) > 1:
        raise AdapterError("the adapter mixes DoRA and plain LoRA branches at modules PEFT holds, and PEFT's "
                           "use_dora applies to all of them; lorafy with one dora setting for those sites")
    tensors = {}
    for key, br in adapter.branches.items():
        values = list(adapter.tensors_of(key))
        if br.magnitude is not None and key in adapter.peft and values[0].dim() > 2:  # PEFT's conv m: (1, out, 1, 1)
            values[2] = values[2].reshape(1, -1, *[1] * (values[0].dim() - 2))
        for name, t in zip(file_keys(br, key in adapter.peft), values, strict=True):
            tensors[name] = t.detach().cpu().contiguous().clone()
    blob = st_save(tensors, metadata={"format": "pt"})
    config = _config(adapter, hashlib.sha256(blob).hexdigest())
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_files_atomically(folder, [(TENSORS, blob), (CONFIG, (json.dumps(config, indent=2) + "\n").encode())])
    return folder


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Reads and validates an adapter folder (lora-fx's or PEFT's), without a model.

    Raises:
        AdapterError: missing files, a pickle-only adapter, a corrupt/truncated file, unknown or
            unpaired tensor names, inconsistent shapes, NaN/inf values, or a config that does not
            describe the tensors.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist or is not a folder; pass the folder "
                           f"holding {CONFIG} and {TENSORS} (download hub adapters first)")
    tpath = folder / TENSORS
    if not tpath.is_file():
        old = " It holds adapter_model.bin, a pickle that lora-fx never loads: re-save it with PEFT " \
              "(safe_serialization=True)." if (folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{tpath} is missing.{old}")
    config = _read_config(folder / CONFIG)
    blob = tpath.read_bytes()
    fx_cfg = config.get("lora_fx") if isinstance(config.get("lora_fx"), dict) else {}
    digest = fx_cfg.get("sha256")
    if digest is not None and hashlib.sha256(blob).hexdigest() != digest:
        raise AdapterError(f"{tpath} does not match the sha256 recorded in {folder / CONFIG}: the file "
                           "was changed, truncated or only half-written; save the adapter again")
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types for every malformed input
        raise AdapterError(f"{tpath} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                           "corrupt or truncated: save the adapter again") from e
    return _parse(tensors, config, fx_cfg, str(tpath))


def file_keys(br: Branch, peft: bool) -> tuple[str, ...]:
    """The tensor names of a branch in ``adapter_model.safetensors`` (PEFT's, or lora_fx.*): A, B and,
    for DoRA, the magnitude (PEFT's ``<key>.lora_magnitude_vector``)."""
    prefix, (a, b) = (_PEFT_PREFIX, kinds.get(br.site.kind).peft_tensors) if peft else \
        (_FX_PREFIX, ("lora_A.weight", "lora_B.weight"))
    names = (f"{prefix}{br.key}.{a}", f"{prefix}{br.key}.{b}")
    return names if br.magnitude is None else (*names, f"{prefix}{br.key}.{_MAGNITUDE}")



# -- helpers ------------------------------------------------------------------------------------------

def _common(values: list, default):
    return Counter(values).most_common(1)[0][0] if values else default


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _config(adapter: Adapter, digest: str) -> dict:
    brs = list(adapter.branches.values())
    peft = [br for br in brs if br.key in adapter.peft]
    r = _common([br.rank for br in peft] or [br.rank for br in brs], 8)
    alpha = _common([br.alpha for br in peft] or [br.alpha for br in brs], r)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": adapter.model or None, "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": _num(alpha),
        "lora_dropout": _common([br.dropout for br in brs], 0.0),
        "target_modules": sorted({br.key for br in peft}),
        "fan_in_fan_out": any(br.site.layout == IN_OUT for br in peft), "bias": "none",
        "use_rslora": adapter.use_rslora, "use_dora": any(br.magnitude for br in (peft or brs)),
        "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {br.key: br.rank for br in peft if br.rank != r},
        "alpha_pattern": {br.key: _num(br.alpha) for br in peft if br.alpha != alpha},
        "lora_fx": {"format": FORMAT, "sha256": digest, "branches": [
            {"key": br.key, "site": br.site.id, "path": br.site.path, "weight": br.site.weight,
             "op": br.site.op, "layout": br.site.layout, "rank": br.rank, "alpha": br.alpha,
             "scale": br.scale, "dropout": br.dropout, "slice": list(br.slice) if br.slice else None,
             "peft": br.key in adapter.peft, "dora": br.magnitude is not None} for br in brs]},
    }


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path} is missing; an adapter folder needs {CONFIG} next to {TENSORS}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); save the adapter again") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}, a PEFT method other than LoRA "
                           "(LoHa, LoKr, VeRA, AdaLoRA, IA3, ...), which lora-fx does not load; it loads LoRA "
                           "adapters (peft_type 'LORA', with use_dora / use_rslora / PiSSA / OLoRA)")
    for flag, what in _UNSUPPORTED.items():
        if config.get(flag):
            raise AdapterError(f"{path}: {flag}={config.get(flag)!r}: {what} is not supported by lora-fx, and "
                               "loading the A/B pairs alone would give another model; save the adapter without it")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS and not (isinstance(init, str) and re.fullmatch(r"pissa(_niter_\d+)?|olora", init)):
        raise AdapterError(f"{path}: init_lora_weights={init!r} changes the base weights in a way lora-fx does not "
                           "reproduce; save the adapter converted to plain LoRA (PEFT's save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=...))")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError(f"{path}: bias={config.get('bias')!r} / modules_to_save="
                           f"{config.get('modules_to_save')!r} store full tensors lora-fx does not load; "
                           "save the PEFT adapter with bias='none' and no modules_to_save")
    return config


def _residual_init(config: dict) -> str:
    """PEFT's PiSSA / OLoRA name of an unconverted adapter (its A/B start from a residual base), else ""."""
    init = config.get("init_lora_weights", True)
    return init if isinstance(init, str) and re.fullmatch(r"pissa(_niter_\d+)?|olora", init) else ""


def _pattern(patterns: dict, key: str, default):
    for pat, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pat})$", key):  # PEFT's get_pattern_key rule
                return value
        except re.error:
            continue
    return default


def _parse(tensors: dict[str, torch.Tensor], config: dict, fx_cfg: dict, source: str) -> Adapter:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    peft_of: dict[str, bool] = {}
    emb: set[str] = set()
    bad = []
    for name, t in tensors.items():
        m = _KEY_RE.fullmatch(name)
        if m is None:
            bad.append(name)
            continue
        key, role = m.group(2), m.group(3)
        pairs.setdefault(key, {})["m" if role == _MAGNITUDE else "a" if "_A" in role else "b"] = t
        peft_of[key] = m.group(1) != "lora_fx"
        if "embedding" in role:
            emb.add(key)
    if bad:
        raise AdapterError(f"{source}: tensors lora-fx does not understand: {sorted(bad)[:8]}; it loads "
                           "LoRA A/B pairs and DoRA magnitudes only (no biases, modules_to_save or other PEFT "
                           "methods' tensors)")
    dora = any("m" in pair for pair in pairs.values())
    if dora != bool(config.get("use_dora", dora)):
        raise AdapterError(f"{source}: use_dora is {config.get('use_dora')!r} but the file "
                           f"{'has' if dora else 'has no'} lora_magnitude_vector tensors; the config does not "
                           "describe these tensors")
    rslora = bool(config.get("use_rslora", False))
    entries = {e.get("key"): e for e in fx_cfg.get("branches", []) if isinstance(e, dict)}
    if entries and entries.keys() != pairs.keys():
        odd = sorted(entries.keys() ^ pairs.keys())[:8]
        raise AdapterError(f"{source}: the lora_fx section of {CONFIG} and the tensors disagree on {odd}; "
                           "save the adapter again")
    out, kept = {}, {}
    for key, pair in sorted(pairs.items()):
        if not {"a", "b"} <= set(pair):
            half = "lora_B" if "a" in pair else "lora_A"
            raise AdapterError(f"{source}: {key} has no {half} tensor; every branch needs both A and B")
        a, b, mag = pair["a"], pair["b"], pair.get("m")
        if mag is not None and mag.numel() == b.shape[0] and all(n == 1 for n in mag.shape if n != b.shape[0]):
            mag = mag.reshape(-1)  # PEFT's convolutions store m as (1, out, 1, 1)
        if dora and (mag is None or not mag.is_floating_point() or tuple(mag.shape) != (b.shape[0],)):
            raise AdapterError(f"{source}: {key}: DoRA needs a lora_magnitude_vector of shape ({b.shape[0]},) "
                               f"(one per row of lora_B), got {None if mag is None else tuple(mag.shape)}")
        if not (a.is_floating_point() and b.is_floating_point()) or a.dim() < 2 or b.dim() < 2 \
                or b.shape[1] != a.shape[0] or any(s != 1 for s in b.shape[2:]):
            raise AdapterError(f"{source}: {key}: A {tuple(a.shape)} {a.dtype} and B {tuple(b.shape)} "
                               f"{b.dtype} are not a LoRA pair (floating A (r, in...), B (out, r))")
        for role, t in (("lora_A", a), ("lora_B", b), (_MAGNITUDE, mag if mag is not None else a)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"{source}: {key}.{role} holds NaN/inf values; the adapter is broken "
                                   "(check training: learning rate, loss scaling)")
        out[key] = br = _branch(key, a, b, config, entries.get(key), peft_of[key], key in emb, rslora, source, dora)
        kept[br.a], kept[br.b] = a, b
        if dora:
            kept[br.magnitude] = mag
    return Adapter(out, kept, rslora, source, frozenset(k for k in out if peft_of[k]),
                   str(config.get("base_model_name_or_path") or ""), _residual_init(config))


def _branch(key: str, a: torch.Tensor, b: torch.Tensor, config: dict, entry: dict | None, peft: bool,
            emb: bool, rslora: bool, source: str, dora: bool = False) -> Branch:
    rank = int(a.shape[0])
    if entry is not None:
        alpha, dropout = float(entry.get("alpha", rank)), float(entry.get("dropout", 0.0))
        sl = entry.get("slice")
        sl = (int(sl[0]), int(sl[1])) if sl else None
        site, weight = str(entry.get("site", key)), str(entry.get("weight", ""))
        op, layout, path = str(entry.get("op", "")), str(entry.get("layout", "")), str(entry.get("path", ""))
        want_rank = int(entry.get("rank", rank))
    else:
        want_rank = int(_pattern(config.get("rank_pattern"), key, config.get("r", rank)))
        alpha = float(_pattern(config.get("alpha_pattern"), key, config.get("lora_alpha", want_rank)))
        dropout, sl, site, weight, path = float(config.get("lora_dropout") or 0.0), None, key, "", key
        layout = IN_OUT if config.get("fan_in_fan_out") else ""  # keeps the flag when saved again
        op = "embedding" if emb else ""
    if want_rank != rank:
        raise AdapterError(f"{source}: {key} has rank {rank} (shape of lora_A {tuple(a.shape)}) but the "
                           f"config says r={want_rank}; the config does not describe these tensors")
    if sl is not None and sl[1] - sl[0] != b.shape[0]:
        raise AdapterError(f"{source}: {key}: slice {sl} is {sl[1] - sl[0]} rows but lora_B has {b.shape[0]}")
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    ref = site_ref(site, path, weight, op, layout)
    names = file_keys(Branch(key, ref, "", "", rank, alpha, scale, magnitude="m" if dora else None), peft)
    return Branch(key, ref, names[0], names[1], rank, alpha, scale, dropout, sl, names[2] if dora else None)


def site_ref(site_id: str, path: str, weight: str, op: str, layout: str) -> Site:
    """The Site a file records for a branch: id, path, weight, op, layout (no shape, no node)."""
    return Site(site_id, path, op, kinds.kind_of(op, layout).name, weight, layout, (), 0, 0, "")
