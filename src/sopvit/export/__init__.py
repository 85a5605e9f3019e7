"""Export trained teacher backbones (timm, safetensors, Hugging Face folder, ONNX) and load them back."""

from sopvit.export.export import EXPORT_FORMATS, ExportFormat, export
from sopvit.export.load import load_pretrained
from sopvit.export.reference import load_reference_checkpoint

__all__ = ["EXPORT_FORMATS", "ExportFormat", "export", "load_pretrained", "load_reference_checkpoint"]
