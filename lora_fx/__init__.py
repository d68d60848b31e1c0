"""lora-fx: LoRA as a graph-rewriting compiler pass.

    gm  = lora_fx.trace(model, (input_ids,))          # capture (torch.export, non-strict)
    lgm = lora_fx.lorafy(gm, ["*.q_proj", "*.v_proj"], rank=8, alpha=16)
    opt = torch.optim.AdamW(lora_fx.lora_parameters(lgm), lr=1e-3)
    ...train...
    folded = lora_fx.fold(lgm)                        # the captured graph again, new weights
    report = lora_fx.fold_and_export(lgm, "task.onnx")
"""

from .adapters import Adapter, adapter_of, load_adapter, read_adapter, save_adapter
from .capture import trace
from .errors import (
                     AdapterError,
                     CaptureError,
                     ExportError,
                     FoldError,
                     LoraFxError,
                     NoLoraError,
                     PatternError,
                     SiteError,
                     TrainingError,
                     VerifyError,
                     WeightsError,
)
from .generation import GenerationError, OnnxGenerator
from .graph_module import LoraFxModule
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .passes.checkpoint import CheckpointedModule, checkpoint
from .passes.fold import FoldReport, fold, strip
from .passes.lorafy import LoraReport, lora_parameters, lorafy
from .passes.quantize_base import quantize_base
from .sites import Site, sites
from .switching import combine_adapters, swap_adapter
from .targets import Target
from .weights import LoadReport, empty_weights, from_config, load_weights

__all__ = [
    "AdapterError", "CaptureError", "ExportError", "FoldError", "FoldReport", "LoraFxError",
    "LoraFxModule", "LoraReport", "NoLoraError", "PatternError", "Site", "SiteError", "Target", "VerifyError", "fold",
    "lora_parameters", "lorafy", "sites", "strip", "trace", "ExportReport", "VerifyReport",
    "fold_and_export", "verify_fold", "ExportOptions", "export_decoder", "Adapter", "adapter_of", "load_adapter", "read_adapter",
    "save_adapter", "combine_adapters", "swap_adapter", "export_multi_lora", "write_ort_adapter",
    "checkpoint", "CheckpointedModule",
    "QuantizeConfig", "quantize_base",
    "WeightsError", "LoadReport", "empty_weights", "from_config", "load_weights",
    "GenerationError", "OnnxGenerator",
    "create_loraplus_optimizer", "loraplus_param_groups", "SaveAdapterCallback", "TrainerModule", "TrainingError",
    "merged_model", "optimize_model",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The export names load on first use: they need onnx, which ``import lora_fx`` does not import."""
    if name in ("ExportOptions", "ExportReport"):
        from .exporters import options as module
    elif name == "fold_and_export":
        from .exporters import pipeline as module
    elif name == "export_decoder":
        from .exporters.decoder import export as module
    elif name in ("export_multi_lora", "write_ort_adapter"):
        from .exporters import multi_lora as module
    elif name == "QuantizeConfig":
        from .exporters import quantize as module
    elif name in ("VerifyReport", "verify_fold"):
        from .exporters.verify import proof as module
    elif name == "merged_model":  # the Hugging Face model with the folded weights (compare generate with ORT)
        from .exporters.decoder import capture as module
    elif name == "optimize_model":  # weight-independent ONNX optimization, for quantizers and other weight tools
        from .exporters.backends.torch_onnx import optimize as module
    elif name in ("SaveAdapterCallback", "TrainerModule"):  # they need transformers
        from . import training as module
    else:
        raise AttributeError(f"module 'lora_fx' has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
