"""int4/int8 quantization of exported files: ``quantizers`` (ONNX Runtime's quantizers, QuantizeConfig,
QuantizeReport, the settings stored in the file) and ``step`` (fold_and_export's quantize step: task and
base quantized alike, proved, errors measured)."""

from .quantizers import QuantizeConfig, QuantizeReport, as_config, quantize_file, read_config

__all__ = ["QuantizeConfig", "QuantizeReport", "as_config", "quantize_file", "read_config"]
