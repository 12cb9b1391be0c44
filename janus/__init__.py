"""janus: Janus-style unified multimodal models (image understanding and generation) in plain PyTorch."""

__version__ = "0.1.0"
