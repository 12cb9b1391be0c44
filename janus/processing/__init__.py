"""Text and image processing: tokenizer, chat template, image pre/post-processing."""

from .chat import (
    DEFAULT_SYSTEM_PROMPT,
    expand_image_tokens,
    generation_prompt,
    render_chat,
    understanding_prompt,
)
from .image import load_image, preprocess_generation, preprocess_understanding, to_pil
from .tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "StreamDecoder",
    "Tokenizer",
    "expand_image_tokens",
    "generation_prompt",
    "load_image",
    "preprocess_generation",
    "preprocess_understanding",
    "render_chat",
    "to_pil",
    "understanding_prompt",
]
