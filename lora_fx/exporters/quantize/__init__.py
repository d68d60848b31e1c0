"""int4/int8 quantization of exported files: ``config`` (QuantizeConfig, QuantizeReport, the settings
stored in the file), ``quantizers`` (ONNX Runtime's quantizers) and ``step`` (fold_and_export's quantize step: task and
base quantized alike, proved, errors measured)."""

from .config import QuantizeConfig, QuantizeReport, as_config, read_config
from .quantizers import quantize_file

__all__ = ["QuantizeConfig", "QuantizeReport", "as_config", "quantize_file", "read_config"]
