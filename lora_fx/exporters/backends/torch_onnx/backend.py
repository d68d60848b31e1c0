"""The torch.onnx backend: the streamed dynamo export, and its structure proof.

    export       streaming: a weightless skeleton in the export dtype (passes/dtype.py rewrites its
                 graph's casts), each weight converted while written (fold in fp32, round once to
                 dtype=...); through fallback.py and optimize.py (optimize=...)
    structure    the base model's skeleton (LoRA stripped) equals the exported one: the base export is
                 this graph with the base weights, proven without exporting it  (verify=True, folded)
    base_export  the base model exported beside it, when the skeletons differ (an untied weight, an
                 unfolded export), for quantize=..., or with verify="full"; the files are compared
"""

from __future__ import annotations

import gc
import os

from ....errors import VerifyError
from ....graph_module import fold_report_of, lora_state
from ... import files
from ...format import derived_source
from ...verify.proof import compare_files
from ...verify.structure import StructureReport
from ..base import Backend, ExportRequest, ExportResult, timed
from .fallback import Fallbacks
from .llm_fusions import DECODER_OPSET
from .streaming import export_streaming, skeleton_spec

__all__ = ["TorchOnnxBackend"]


class TorchOnnxBackend(Backend):
    """torch.onnx.export (dynamo), streamed; proof from the skeletons or a base export."""

    name = "torch_onnx"
    priority = 0

    def export(self, request: ExportRequest) -> ExportResult:
        o = request.options
        fallbacks = Fallbacks()  # fixes the exporter needed; reused for the base export
        seconds: dict[str, float] = {}
        with timed(seconds, "export"):
            info = self._write(request.module, request.staged, request, fallbacks)
            fallbacks.settled = True  # the base export of the proof repeats the task's fixes, adds none
            fold_report = fold_report_of(request.module)
            untied = dict(fold_report.untied) if fold_report else {}
            spec = skeleton_spec(request.module, o.dtype) if o.verify else None
            request.module = None  # the folded copies of the adapted weights: not needed by the proof
            gc.collect()  # a GraphModule is a reference cycle (graph <-> module): free them before ORT runs
        result = ExportResult(info, notes=fallbacks.notes, seconds=seconds)
        if not o.verify:
            return result
        if o.verify is True and o.folded and o.quantize is None:
            with timed(seconds, "structure"):
                result.structure = self._skeleton_proof(request, spec, info, result.notes)
        if result.structure is None:
            base = os.path.join(request.folder, "base.onnx")
            with timed(seconds, "base_export"):
                result.base = self._write(request.base, base, request, fallbacks)
            with timed(seconds, "structure"):  # the files compared
                files.check(base, error=VerifyError, role="base")
                result.structure = compare_files(base, request.staged, untied=untied, numerics_only=not o.folded)
        return result

    @staticmethod
    def _write(module, path: str, request: ExportRequest, fallbacks: Fallbacks):
        o = request.options
        # a decoder LLM at opset 23: torch writes sdpa as ONNX Attention, which llm_fusions builds on
        decoder = request.decoder is not None and o.optimize is not False
        opset = o.opset if o.opset is not None or not decoder else DECODER_OPSET
        if opset != o.opset and not fallbacks.settled:
            fallbacks.default_opset = opset  # chosen here, not by the user: dropped if torch fails at it
        return export_streaming(module, path, request.args, request.kwargs, dtype=o.dtype,
                                exporter=fallbacks.export, dynamic_shapes=request.shapes, opset=opset,
                                external_data=o.external_data, optimize=o.optimize, model_type=o.model_type,
                                decoder=decoder)

    @staticmethod
    def _skeleton_proof(request: ExportRequest, spec, info, notes: list[str]) -> StructureReport | None:
        """The base model (LoRA stripped) as the exporter would see it equals what it exported, so its
        export would be this very graph (SkeletonSpec). None when they differ (an untied weight is an
        extra tensor): the base is then exported for a file comparison."""
        diff = spec.first_difference(skeleton_spec(request.base, request.options.dtype))
        if diff is not None:
            notes.append(f"the base model's skeleton differs from the export's ({diff}): "
                         "the structure is compared with an exported base file instead")
            return None
        adapted = {br.site.weight for br in lora_state(request.lgm, "fold_and_export").branches}
        changed = sorted(n for n in files.initializer_names(request.staged) if derived_source(n)[0] in adapted)
        return StructureReport(ok=True, base_nodes=info.nodes, task_nodes=info.nodes, changed_initializers=changed,
                               by_construction=True)
