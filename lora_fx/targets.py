"""The pattern language: which sites to adapt, and with which rank / alpha / dropout / slices.

A pattern selects a site when it matches the site's id (``path`` or ``path#k`` for one of several
calls), its module path (``transformer.h.0.attn.c_attn``) or its weight's qualified name
(``blocks.0.wq`` for raw parameters used by functional ops):

* a glob string: ``"*.q_proj"``; a plain name ``"q_proj"`` also matches as a dotted suffix (PEFT's rule);
* a compiled regex: full match, like PEFT's string ``target_modules``;
* a :class:`Target` carrying per-target settings;
* ``"all-linear"``: every linear-like site (``nn.Linear``, GPT-2's ``Conv1D`` addmm, ``x @ W.T``) except
  the output head, PEFT's shorthand (see :func:`select`'s ``heads``).

A list of patterns follows PEFT's rule: it is an error only when no pattern selects a site; the ones that
select nothing are returned by :func:`resolve` (lorafy warns and lists them in its report).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import kinds
from .errors import PatternError, SiteError
from .sites import Site

__all__ = ["ALL_LINEAR", "as_targets", "is_all_linear", "matches", "matches_names", "max_rank", "no_match",
    "none_matched", "owner_path", "parse_patterns", "resolve", "select", "Selection", "site_names",
    "site_patterns", "Target"]


@dataclass(frozen=True)
class Target:
    """A pattern plus the LoRA settings of the sites it selects (None = the lorafy() default).

    Args:
        pattern: glob string or compiled regex.
        rank, alpha, dropout: per-target LoRA settings.
        ops: restrict to op names or kinds (``("linear",)``, ``("addmm", "conv2d")``).
        slices: adapt only these output ranges of a fused weight, one A/B pair each. Ranges as
            ``(start, stop)`` pairs or ``slice`` objects; with ``chunks=n``, ints pick chunks of n equal
            parts: ``Target("*.c_attn", slices=[0, 2], chunks=3)`` adapts q and v of GPT-2's qkv.
        chunks: see ``slices``.
        dora, init: DoRA and the A/B initialisation at these sites (see :func:`lora_fx.lorafy`).
    """

    pattern: str | re.Pattern[str]
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    ops: tuple[str, ...] | None = None
    slices: tuple | None = None
    chunks: int | None = None
    dora: bool | None = None  # DoRA at these sites (None: lorafy's dora=)
    init: str | None = None  # "kaiming", "gaussian", "pissa", "pissa_niter_<N>", "olora" (None: lorafy's init=)

    def matches(self, site: Site) -> bool:
        if self.ops is not None and site.op not in self.ops and site.kind not in self.ops:
            return False
        return matches(self.pattern, site)


@dataclass(frozen=True)
class Selection:
    """One selected site with its resolved settings."""

    site: Site
    rank: int
    alpha: float
    dropout: float
    slices: tuple[tuple[int, int], ...] | None  # output ranges, None = the whole weight
    note: str | None = None  # e.g. rank above what the site's update can use
    dora: bool | None = None  # the Target's (lorafy settles None to its own default)
    init: str | None = None

    @property
    def scale_base(self) -> float:
        return self.alpha / self.rank


def site_names(site: Site) -> tuple[str, ...]:
    """The names a pattern is matched against: id, module path, weight, and the weight's owner module.

    The owner counts when the calling module reaches into a child's weight
    (``F.linear(x, self.qkv.weight, bias)`` in timm's attention: path ``blocks.0.attn``, owner
    ``blocks.0.attn.qkv``), so ``"*.attn.qkv"`` selects it as PEFT users expect. A tied weight read by
    another module (GPT-2's ``lm_head`` reading ``wte.weight``) is not owned below its caller and keeps
    matching only as ``lm_head``.
    """
    names = (site.id, site.path, site.weight)
    owner = owner_path(site)
    return names + (owner,) if owner != site.path else names


def owner_path(site: Site) -> str:
    """The module LoRA of this site belongs to (:attr:`Site.owner`): the weight's owner when the caller
    reached into a child's weight (see :func:`site_names`), else the calling module's path."""
    return site.owner


ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND


def is_all_linear(pattern: object) -> bool:
    """Whether a pattern is PEFT's ``"all-linear"`` shorthand (any case, as PEFT compares it)."""
    return isinstance(pattern, str) and pattern.lower() == ALL_LINEAR


def matches(pattern: str | re.Pattern[str], site: Site) -> bool:
    if is_all_linear(pattern):
        return site.kind == "linear"
    return matches_names(pattern, site_names(site))


def matches_names(pattern: str | re.Pattern[str], names: Sequence[str]) -> bool:
    """The pattern rules on plain names: regex full match, anchored glob, or exact / dotted suffix."""
    if isinstance(pattern, re.Pattern):
        return any(pattern.fullmatch(n) for n in names)
    if any(c in pattern for c in "*?["):
        # "*.fc" also selects a top-level "fc": the "*." prefix may stand for no leading component
        top = pattern[2:] if pattern.startswith("*.") else None
        return any(fnmatch.fnmatchcase(n, pattern) or (top is not None and fnmatch.fnmatchcase(n, top))
                   for n in names)
    return any(n == pattern or n.endswith("." + pattern) for n in names)


def as_targets(patterns) -> list[Target]:
    """Normalises str / regex / Target / a list of them into Targets."""
    if isinstance(patterns, (str, re.Pattern, Target)):
        patterns = [patterns]
    if not isinstance(patterns, Iterable):
        raise PatternError(f"patterns must be a glob string, a regex, a Target or a list of them; "
                           f"got {type(patterns).__name__}")
    out = []
    for p in patterns:
        if isinstance(p, Target):
            t = p
        elif isinstance(p, (str, re.Pattern)):
            t = Target(p)
        else:
            raise PatternError(f"pattern {p!r} is a {type(p).__name__}; use a glob string, a compiled "
                               "regex or lora_fx.Target")
        if isinstance(t.pattern, str) and not t.pattern.strip():
            raise PatternError("empty pattern: use '*' to select every site")
        if t.ops is not None:
            known = set(kinds.KINDS) | kinds.op_names()
            bad = [o for o in t.ops if o not in known]
            if bad:
                raise PatternError(f"Target({_show(t.pattern)}): unknown op(s) {bad}; supported: "
                                   f"{sorted(known)}")
        out.append(t)
    if not out:
        raise PatternError("no patterns given: pass e.g. '*.q_proj' or ['*.q_proj', '*.v_proj']")
    return out


def select(all_sites: Sequence[Site], patterns, *, rank: int, alpha: float | None, dropout: float,
           exclude=None, heads: Collection[str] = ()) -> list[Selection]:
    """:func:`resolve`'s selections (first match wins); PatternError when no pattern selects a site."""
    return resolve(all_sites, patterns, rank=rank, alpha=alpha, dropout=dropout, exclude=exclude, heads=heads)[0]


def resolve(all_sites: Sequence[Site], patterns, *, rank: int, alpha: float | None, dropout: float,
            exclude=None, heads: Collection[str] = (),
            explain: Callable[[Target], str] | None = None) -> tuple[list[Selection], list[Target]]:
    """Resolves patterns against sites: (selections in graph order, the targets that selected nothing).

    PEFT's rule for a list: an error (PatternError naming each pattern and its closest sites) only when
    no pattern selects a site. ``heads``: module paths ``"all-linear"`` leaves out (the output head).
    ``explain(target)``: the message for a target that selected nothing (default: its closest sites).
    """
    targets = as_targets(patterns)
    excluded = as_targets(exclude) if exclude else []
    chosen: dict[str, Selection] = {}
    unmatched = []
    for t in targets:
        hit = [s for s in all_sites if t.matches(s)
               and not (is_all_linear(t.pattern) and (s.path in heads or owner_path(s) in heads))]
        if not hit:
            unmatched.append(t)
        for s in hit:
            if s.id in chosen or any(e.matches(s) for e in excluded):
                continue
            chosen[s.id] = _resolve(t, s, rank, alpha, dropout)
    if len(unmatched) == len(targets):
        explain = explain or (lambda t: no_match([t], all_sites))
        raise PatternError(none_matched([explain(t) for t in unmatched]))
    if not chosen:
        raise PatternError(f"every site selected by {[_show(t.pattern) for t in targets]} is excluded "
                           f"by {[_show(e.pattern) for e in excluded]}")
    order = {s.id: i for i, s in enumerate(all_sites)}
    return sorted(chosen.values(), key=lambda sel: order[sel.site.id]), unmatched


def _show(p) -> str:
    return repr(p.pattern) if isinstance(p, re.Pattern) else repr(p)


def no_match(targets: Sequence[Target], all_sites: Sequence[Site]) -> str:
    """The message for patterns that select no site: each one with its closest sites."""
    return none_matched([_no_match(t, all_sites) for t in targets])


def none_matched(messages: Sequence[str]) -> str:
    """One message per pattern that selected nothing, as one error."""
    if len(messages) == 1:
        return messages[0]
    return (f"none of the {len(messages)} patterns selects a site (a list is an error only then, as in PEFT):\n  "
            + "\n  ".join(messages))


def site_patterns(all_sites: Sequence[Site], near: str | None = None, n: int = 3) -> dict[str, list[Site]]:
    """Plain-name patterns that select sites of this model (the sites' last path components, ``c_attn``,
    which match as dotted suffixes), each with the sites it selects.

    With ``near`` (a pattern that matched nothing), the names most similar to its last component come
    first; without, the names repeated most often (the per-block layers a pattern usually means).
    """
    by_name: dict[str, list[Site]] = {}
    for s in all_sites:
        leaves = [c.rpartition(".")[2] for c in (s.path, s.weight) if c]
        by_name.setdefault(next((leaf for leaf in leaves if matches(leaf, s)), s.id), []).append(s)
    order = {name: i for i, name in enumerate(by_name)}
    if near is None:
        ranked = sorted(by_name, key=lambda k: (-len(by_name[k]), order[k]))
    else:
        leaf = near.strip("*.?").rpartition(".")[2].lower()
        ranked = sorted(by_name, key=lambda k: (-difflib.SequenceMatcher(None, leaf, k.lower()).ratio(), order[k]))
    return {name: by_name[name] for name in ranked[:n]}


def _no_match(t: Target, all_sites: Sequence[Site]) -> str:
    if is_all_linear(t.pattern):
        found = sorted({s.op for s in all_sites})
        return (f"pattern {_show(t.pattern)} selects no linear site other than the output head; this model's "
                f"sites are {found or 'none'}. List them with lora_fx.sites(gm).")
    key = t.pattern.pattern if isinstance(t.pattern, re.Pattern) else t.pattern
    bare = key.strip("*.?")
    hint = "; ".join(f"{name!r} ({', '.join(s.id for s in hits[:2])}{', ...' if len(hits) > 2 else ''})"
                     for name, hits in site_patterns(all_sites, near=key).items())
    only = f" (restricted to ops {t.ops})" if t.ops else ""
    return (f"pattern {_show(t.pattern)}{only} matches no adaptable site among {len(all_sites)}; "
            f"closest: {hint}.{_fused_hint(bare, all_sites)} List them all with lora_fx.sites(gm).")


_SEPARATE_QKV = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v", "q_lin", "v_lin", "k_lin"}
_FUSED_QKV = ("c_attn", "qkv", "query_key_value", "Wqkv", "qkv_proj", "in_proj_weight")


def _fused_hint(bare: str, all_sites: Sequence[Site]) -> str:
    """For a separate q/k/v name on a model that fuses them (GPT-2's c_attn), say how to adapt the slices."""
    if bare.split(".")[-1] not in _SEPARATE_QKV:
        return ""
    fused = next((n for s in all_sites for n in (s.path, s.weight)
                  if any(n == f or n.endswith("." + f) for f in _FUSED_QKV)), None)
    if fused is None:
        return ""
    leaf = fused.rpartition(".")[2]
    return (f" This model fuses q, k and v into one weight ({fused}): target '{leaf}', or only some of them with "
            f"lora_fx.Target('*.{leaf}', slices=[0, 2], chunks=3) (q and v).")


def _resolve(t: Target, s: Site, rank: int, alpha: float | None, dropout: float) -> Selection:
    r = t.rank if t.rank is not None else rank
    a = t.alpha if t.alpha is not None else alpha
    d = t.dropout if t.dropout is not None else dropout
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise SiteError(f"site {s.id}: rank must be a positive int, got {r!r}")
    a = float(r) if a is None else a
    if not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
        raise SiteError(f"site {s.id}: alpha must be a finite number > 0, got {a!r}")
    if not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise SiteError(f"site {s.id}: dropout must be in [0, 1), got {d!r}")
    slices = _slices(t, s)
    return Selection(s, r, float(a), float(d), slices, _rank_note(s, r, slices), t.dora, t.init)


def max_rank(s: Site, slices: tuple[tuple[int, int], ...] | None = None) -> int:
    """The largest rank an update of the site can have: min(fan-in, out) over its (sliced) outputs.

    A conv's A sees ``in x kh x kw`` inputs, so a 3-channel 16x16 patch embedding has fan-in 768.
    """
    fan_in = kinds.get(s.kind).lora_in(s)  # elements of one row of A
    widths = [b - a for a, b in slices] if slices else [s.out_features]
    return min(fan_in, *widths)


def _rank_note(s: Site, r: int, slices) -> str | None:
    # PEFT accepts any rank; so do we. Above the limit the extra rank trains but adds nothing: say so.
    limit = max_rank(s, slices)
    if r <= limit:
        return None
    return (f"site {s.id} ({s.op} {s.weight}): rank {r} exceeds min(fan-in, out) = {limit}, the most its "
            f"update can have; the extra rank adds parameters, not expressiveness (rank <= {limit} suffices)")


def _slices(t: Target, s: Site) -> tuple[tuple[int, int], ...] | None:
    if t.slices is None:
        if t.chunks is not None:
            raise SiteError(f"site {s.id}: chunks={t.chunks} needs slices=[chunk indices]")
        return None
    if not kinds.get(s.kind).slices:
        with_slices = sorted(k for k, kind in kinds.KINDS.items() if kind.slices)
        raise SiteError(f"site {s.id}: slices work on linear-like ops (kinds {with_slices}: "
                        f"linear/addmm/mm/matmul), not {s.op}")
    out = s.out_features
    ranges = []
    for item in t.slices:
        if isinstance(item, slice):
            start, stop, step = item.indices(out)
            if step != 1:
                raise SiteError(f"site {s.id}: slice {item} has step {step}; only contiguous ranges")
        elif isinstance(item, int) and t.chunks:
            if out % t.chunks:
                raise SiteError(f"site {s.id}: out_features {out} is not divisible into {t.chunks} chunks")
            if not 0 <= item < t.chunks:
                raise SiteError(f"site {s.id}: chunk {item} out of range 0..{t.chunks - 1}")
            size = out // t.chunks
            start, stop = item * size, (item + 1) * size
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            start, stop = item
        else:
            raise SiteError(f"site {s.id}: slice {item!r} is not (start, stop), a slice, or a chunk "
                            "index with chunks=n")
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= out):
            raise SiteError(f"site {s.id}: slice {item!r} is out of range for {out} output features")
        ranges.append((start, stop))
    ranges.sort()
    for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False):
        if c < b:
            raise SiteError(f"site {s.id}: slices {ranges} overlap")
    if not ranges:
        raise SiteError(f"site {s.id}: slices is empty")
    return tuple(ranges)


def parse_patterns(patterns: Sequence[str]) -> list[Any]:
    """Patterns written as text (the command line) -> lorafy patterns.

    ``re:REGEX`` is a compiled regex, ``PATTERN@R`` a :class:`Target` with rank R, anything else a
    glob / plain name as is: ``["*.query", "head@4", "re:.*\\.(query|value)"]``.
    """
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
                raise PatternError(f"pattern {text!r}: invalid regular expression ({e})") from e
        out.append(Target(pattern, rank=rank) if rank is not None else pattern)
    return out
