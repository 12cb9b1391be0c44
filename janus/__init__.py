"""janus: Janus-style unified multimodal models (image understanding and generation) in plain PyTorch.

    import janus
    model = janus.load("path/to/Janus-Pro-1B")          # official, transformers or native layout
    images = model.generate_image("a red circle above a blue square", n=4, seed=0)
    answer = model.chat("What is in this picture?", images=["photo.png"])
"""

from .checkpoint import CheckpointError
from .pipeline import Janus, chat, generate_image, load

__version__ = "0.1.0"
__all__ = ["Janus", "CheckpointError", "load", "generate_image", "chat"]
