"""The coverage sweep: every model of ``sweep_models.SWEEP`` through every stage, results to JSON and docs/coverage.md.

Stages (each records ``"ok"`` or the error it raised, first line)::

    trace    lora_fx.trace(model, args, kwargs)
    lorafy   each PEFT-style pattern of the model selects a site; then lorafy(gm, "*", rank=4, dropout=0.05)
    train    one AdamW step on the LoRA parameters (train mode) moves every B that gets a gradient
    fold     lora_fx.fold(lgm) computes what lgm computes (eval)
    export   lora_fx.fold_and_export(lgm, path): folded export + base export + ONNX Runtime check
    verify   the export's report: structure == base export, ORT vs torch within tolerance

A stage after a failed one is ``"skipped"``. When ``export`` fails, the plain ``torch.onnx.export`` of the
base model is tried, so the table can say whether the base model exports at all.

With ``--kv`` a decoder (families ``KV_FAMILIES``, causal-LM heads) that passed every stage also goes through
``fold_and_export(lgm, path, kv_cache=True)`` (the KV-cache export: recapture with past/present, proof, ORT
prefill + decode checks); its result is the row's ``kv_cache`` ("ok" or the error), kept across runs without
``--kv``.

    python tests/sweep.py [--only NAME,...] [--family F] [--kv] [--out tests/sweep_results.json] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # this checkout's lora_fx, not another installed copy

from helpers import first_tensor  # noqa: E402
from sweep_models import FAMILIES, SWEEP, SweepModel, vision_import  # noqa: E402

import lora_fx  # noqa: E402

STAGES = ("trace", "lorafy", "train", "fold", "export", "verify")
KV_FAMILIES = ("decoder", "moe")  # causal-LM heads: the families the kv_cache=True export applies to
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep_results.json")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "coverage.md")
BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"


@dataclass
class SweepResult:
    family: str
    name: str
    cls: str = ""
    stages: dict[str, str] = field(default_factory=dict)
    sites: int = 0
    pairs: int = 0
    nodes: int = 0
    max_rel_err: float | None = None
    base_exports: bool | None = None  # None: not checked (export passed)
    kv_cache: str | None = None  # the kv_cache=True export: "ok", its error, or None (not run)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    times: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.stages.get(s) == "ok" for s in STAGES)


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return " ".join(text.split("\n")[:3])[:400]


def run_model(entry: SweepModel, workdir: str, kv: bool = False) -> SweepResult:
    """Runs one model through every stage; never raises (errors are recorded per stage).

    ``kv``: a model of ``KV_FAMILIES`` that passed every stage is also exported with ``kv_cache=True``.
    """
    res = SweepResult(entry.family, entry.name)
    start = time.perf_counter()
    state: dict = {}

    def stage(name, fn):
        if any(v != "ok" for v in res.stages.values()):
            res.stages[name] = "skipped"
            return
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
            res.notes += sorted({str(w.message).splitlines()[0][:200] for w in caught
                                 if "lora_fx" in str(w.message) or issubclass(w.category, UserWarning)
                                 and str(w.message).startswith("lora_fx")})
            res.stages[name] = "ok"
        except Exception as e:  # recorded, not raised: the sweep reports every model
            res.stages[name] = _first_line(e)
            if os.environ.get("SWEEP_TRACEBACK"):
                traceback.print_exc()
        res.times[name] = round(time.perf_counter() - t0, 2)

    def do_trace():
        model, args, kwargs = entry.build()
        res.cls = type(model).__name__
        state.update(model=model, args=args, kwargs=kwargs)
        state["gm"] = lora_fx.trace(model, args, kwargs)

    def do_lorafy():
        gm = state["gm"]
        found = lora_fx.sites(gm)
        res.sites = len(found)
        for pattern in entry.targets:
            lora_fx.lorafy(gm, pattern, rank=2)  # raises PatternError when it selects nothing
        lgm = lora_fx.lorafy(gm, "*", rank=4, dropout=0.05)
        res.pairs = len(lgm.lora_report.branches)
        state["lgm"] = lgm

    def do_train():
        lgm, args, kwargs = state["lgm"], state["args"], state["kwargs"]
        params = lora_fx.lora_parameters(lgm)
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2)
        lgm.train()
        loss = first_tensor(lgm(*args, **kwargs)).float().pow(2).mean()
        loss.backward()
        opt.step()
        lgm.eval()
        moved = sum(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
        if not moved:
            raise AssertionError("one training step changed no LoRA parameter (no gradient reached them)")

    def do_fold():
        lgm, args, kwargs = state["lgm"], state["args"], state["kwargs"]
        folded = lora_fx.fold(lgm)
        with torch.no_grad():
            want, got = first_tensor(lgm(*args, **kwargs)), first_tensor(folded(*args, **kwargs))
        err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
        if err > 1e-4:
            raise AssertionError(f"fold changed the output: max rel err {err:.2e}")

    def do_export():
        path = os.path.join(workdir, f"{entry.family}_{entry.name}.onnx")
        rep = lora_fx.fold_and_export(state["lgm"], path, verify=True)
        state["report"] = rep
        res.nodes = rep.export.nodes
        res.notes += list(getattr(rep, "notes", []) or [])

    def do_verify():
        ver = state["report"].verification
        res.max_rel_err = max((c.max_rel_err for c in ver.numerics), default=None)
        if not ver.ok or not ver.numerics:
            raise AssertionError(f"verification failed: {ver}")

    for name, fn in zip(STAGES, (do_trace, do_lorafy, do_train, do_fold, do_export, do_verify), strict=True):
        stage(name, fn)
    if res.stages["export"] not in ("ok", "skipped"):
        res.base_exports = _base_exports(state, workdir)
    if kv and res.ok and entry.family in KV_FAMILIES:
        res.kv_cache = _kv_export(state, entry, workdir, res)
    res.seconds = round(time.perf_counter() - start, 2)
    return res


def _kv_export(state: dict, entry: SweepModel, workdir: str, res: SweepResult) -> str:
    """``fold_and_export(lgm, folder/model.onnx, kv_cache=True)`` of the trained module: "ok" or the error."""
    t0 = time.perf_counter()
    folder = os.path.join(workdir, f"{entry.family}_{entry.name}_kv")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora_fx.fold_and_export(state["lgm"], os.path.join(folder, "model.onnx"), kv_cache=True)
        return "ok"
    except Exception as e:  # recorded, not raised
        if os.environ.get("SWEEP_TRACEBACK"):
            traceback.print_exc()
        return _first_line(e)
    finally:
        res.times["kv_cache"] = round(time.perf_counter() - t0, 2)


def _base_exports(state: dict, workdir: str) -> bool:
    """Whether plain torch.onnx.export (dynamo, the same dynamic shapes) exports the base model."""
    from lora_fx.capture import dynamic_shapes_for

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(state["model"], state["args"], kwargs=state["kwargs"], dynamo=True,
                              dynamic_shapes=dynamic_shapes_for(state["args"], state["kwargs"]), verbose=False)
        return True
    except Exception:
        return False


def run(entries: list[SweepModel], out: str | None = RESULTS, log=print, kv: bool = False) -> list[SweepResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="lora_fx_sweep.") as tmp:
        for entry in entries:
            if entry.family in ("timm", "torchvision") and (why := vision_import()):
                results.append(SweepResult(entry.family, entry.name, stages={s: f"skipped: {why}" for s in STAGES}))
                if out:
                    merge(out, results[-1:])
                continue
            r = run_model(entry, tmp, kv=kv)
            results.append(r)
            if out:  # after every model: a sweep stopped half-way keeps what it measured
                merge(out, [r])
            log(f"{r.family:<16} {r.name:<22} {'PASS' if r.ok else 'FAIL'} {r.seconds:6.1f}s "
                + " ".join(f"{k}={v:.1f}" for k, v in r.times.items()) + " "
                + ("" if r.ok else next(f"{s}: {v}" for s, v in r.stages.items() if v != "ok"))
                + ("" if r.kv_cache in (None, "ok") else f"kv_cache: {r.kv_cache}"))
    return results


def merge(path: str, results: list[SweepResult]) -> None:
    """Writes results into the JSON file, replacing earlier entries of the same models."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["models"]
    keys = {(r.family, r.name) for r in results}
    kept_kv = {(o["family"], o["name"]): o.get("kv_cache") for o in old}
    new = [asdict(r) for r in results]
    for row in new:  # a run without --kv keeps the kv_cache result of an earlier --kv run
        if row["kv_cache"] is None and all(row["stages"].get(s) == "ok" for s in STAGES):
            row["kv_cache"] = kept_kv.get((row["family"], row["name"]))
    rows = [o for o in old if (o["family"], o["name"]) not in keys] + new
    order = {(m.family, m.name): i for i, m in enumerate(SWEEP)}
    rows.sort(key=lambda o: order.get((o["family"], o["name"]), 1 << 30))
    meta = {"torch": torch.__version__, "transformers": _version("transformers"), "timm": _version("timm"),
            "date": time.strftime("%Y-%m-%d")}
    with open(path, "w") as f:
        json.dump({"meta": meta, "models": rows}, f, indent=1)
        f.write("\n")


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def table(path: str = RESULTS) -> str:
    """The README section: one table per family, generated from the JSON."""
    with open(path) as f:
        data = json.load(f)
    rows, meta = data["models"], data["meta"]
    passed = sum(all(r["stages"].get(s) == "ok" for s in STAGES) for r in rows)
    lines = [f"{passed} of {len(rows)} models pass every stage (random tiny configs; torch {meta['torch']}, "
             f"transformers {meta['transformers']}, timm {meta['timm']}; `python tests/sweep.py --readme` "
             "regenerates this). A cell is ✓ or the error the stage raised; `*` LoRA on every site.", ""]
    kv_rows = [r for r in rows if r.get("kv_cache") is not None]
    if kv_rows:
        lines[0] += (f" `kv_cache`: `fold_and_export(lgm, path, kv_cache=True)` of the trained module (`--kv`): "
                     f"{sum(r['kv_cache'] == 'ok' for r in kv_rows)} of {len(kv_rows)} decoders run pass; "
                     "empty: not run.")
    for fam in FAMILIES:
        fam_rows = [r for r in rows if r["family"] == fam]
        if not fam_rows:
            continue
        stages = STAGES + (("kv_cache",) if any(r.get("kv_cache") for r in fam_rows) else ())
        lines += [f"**{fam}** ({sum(all(r['stages'].get(s) == 'ok' for s in STAGES) for r in fam_rows)}"
                  f"/{len(fam_rows)})", "",
                  "| model | class | sites | " + " | ".join(stages) + " | ORT rel err | note |",
                  "|---|---|---|" + "---|" * len(stages) + "---|---|"]
        for r in fam_rows:
            cells = ["✓" if r["stages"].get(s) == "ok" else _cell(r["stages"].get(s, "")) for s in STAGES]
            if len(stages) > len(STAGES):
                kv = r.get("kv_cache")
                cells.append("" if kv is None else "✓" if kv == "ok" else _cell(kv))
            err = f"{r['max_rel_err']:.1e}" if r.get("max_rel_err") is not None else ""
            note = _short_notes(r.get("notes") or [])
            if r.get("base_exports") is False:
                note = ("plain torch.onnx.export fails on the base model too; " + note).strip("; ")
            lines.append(f"| {r['name']} | {r['cls']} | {r['sites']} | " + " | ".join(cells)
                         + f" | {err} | {_cell(note, 160)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_SHORT = (("ONNX translation", "grouped_mm: transformers' ONNX translation"),
          ("aten.view exported as aten.reshape", "views exported as reshapes"),
          ("train-mode capture", "train-mode capture failed (LayerDrop): eval graph's dropout only"),
          ("fixed dimension", "sequence length fixed by the model's code (static in the export)"),
          ("unoptimized: ", "the ONNX optimizer failed: unoptimized file (dynamic)"),
          ("static: the dynamic export failed", "the dynamic export failed in torch.onnx: static file"))


def _short_notes(notes: list[str]) -> str:
    """The table's note cell: fixes and fallbacks by name; rank notes counted."""
    out = [short for key, short in _SHORT if any(key in n for n in notes)]
    ranks = sum("exceeds min(fan-in, out)" in n for n in notes)
    if ranks:
        out.append(f"rank 4 above what {ranks} tiny site(s) can use (a note)")
    return "; ".join(out)


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_readme(path: str = README, results: str = RESULTS) -> None:
    with open(path) as f:
        text = f.read()
    if BEGIN not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{table(results)}{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--family")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--readme", action="store_true", help="regenerate the tables of docs/coverage.md from --out")
    ap.add_argument("--no-run", action="store_true")
    ap.add_argument("--kv", action="store_true", help="also the kv_cache=True export of decoders that pass")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)
    entries = [m for m in SWEEP if (not a.only or m.name in a.only.split(","))
               and (not a.family or m.family == a.family)]
    if not a.no_run:
        run(entries, a.out, kv=a.kv)
    if a.readme:
        write_readme(results=a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
