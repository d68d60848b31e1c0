"""Exceptions raised by lora-fx.

Every error names the culprit (node, module path, file) and says what would work. They derive from
the builtin type a caller would naturally catch (ValueError for bad arguments, RuntimeError for
failures of a step), so ``except ValueError`` keeps working in user code.
"""

from __future__ import annotations

__all__ = ["AdapterError", "CaptureError", "ExportError", "FoldError", "LoraFxError", "NoLoraError",
    "PatternError", "short_message", "SiteError", "TrainingError", "VerifyError", "WeightsError"]


class LoraFxError(Exception):
    """Base class of every error lora-fx raises on purpose."""


class CaptureError(LoraFxError, RuntimeError):
    """The model could not be captured into a graph."""


class PatternError(LoraFxError, ValueError):
    """A target pattern is malformed or matches no site."""


class SiteError(LoraFxError, ValueError):
    """A selected site cannot be adapted as asked (rank, slices, weight that is not a parameter...)."""


class FoldError(LoraFxError, ValueError):
    """A module cannot be folded (no LoRA in it, non-finite delta...)."""


class ExportError(LoraFxError, RuntimeError):
    """Writing or running an ONNX file failed."""


class VerifyError(LoraFxError):
    """A verification could not be carried out (a failed proof is a report, not an exception)."""


class AdapterError(LoraFxError, ValueError):
    """An adapter file is missing, corrupt, or does not fit the model."""


class NoLoraError(FoldError, AdapterError, SiteError, ExportError):
    """A step that needs a lorafied module got one without LoRA.

    Raised by the one check :func:`lora_fx.graph_module.lora_state` for every step (fold, export,
    adapters, lora_parameters), so it is each of the step errors an older caller may catch.
    """


class WeightsError(LoraFxError, ValueError):
    """A checkpoint does not fit the captured module, or weights are still on the meta device."""


class TrainingError(LoraFxError, ValueError):
    """A lorafied module cannot be trained as a trainer asks (Hugging Face Trainer / TRL glue: inputs,
    checkpointing options, an LM head SFTTrainer reads directly)."""


def short_message(exc: BaseException, limit: int = 8) -> str:
    """Short form of an exception for an error message: the type, and at most ``limit`` lines (torch's
    exporter writes hundreds of lines of advice and graphs; its real cause is under "Exception summary")."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    head, found, summary = text.partition("## Exception summary")
    lines = head.splitlines()[:1] + summary.strip().splitlines() if found else text.splitlines()
    more = f" ... ({len(lines) - limit} more lines)" if len(lines) > limit else ""
    return f"{type(exc).__name__}: " + "\n".join(lines[:limit]) + more
