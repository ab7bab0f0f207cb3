"""qvl-surgery: export the Qwen2.5-VL vision encoder to ONNX once, then run graph passes on it."""
__version__ = "0.1.0"
