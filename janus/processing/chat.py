"""The "deepseek" chat template (DESIGN.md §3) and image-token expansion.

Rendering: optional `system + "\\n\\n"`, then `role + ": " + content` followed by "\\n\\n" after a user turn
and the EOS token after an assistant turn; an empty final assistant turn renders as `role + ":"`, the
cue for the model to answer. The official template picks the separator by turn index (even: "\\n\\n",
odd: EOS), which equals the by-role rule because turns must alternate user/assistant from a user turn.
"""

from __future__ import annotations

from .tokenizer import BOI_TOKEN, EOI_TOKEN, EOS_TOKEN, IMAGE_TOKEN, Tokenizer

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)

_ROLE_KEYS = ("user", "assistant")


def render_chat(messages: list[dict], roles: tuple[str, str], system: str = "") -> str:
    """Render alternating user/assistant messages (`{"role", "content"}`) into one prompt string.

    `roles` are the names written for user and assistant: `("<|User|>", "<|Assistant|>")` for Janus-Pro,
    `("User", "Assistant")` for Janus-1.3B. BOS is not included: the tokenizer prepends it.
    """
    if len(roles) != 2 or not all(isinstance(r, str) and r for r in roles):
        raise ValueError(f"roles must be two non-empty strings (user, assistant), got {roles!r}")
    if not messages:
        raise ValueError("messages is empty")
    parts = [system + "\n\n"] if system else []
    for i, message in enumerate(messages):
        role, content = _check_message(message, i)
        if role != _ROLE_KEYS[i % 2]:
            raise ValueError(f"message {i} has role {role!r}: turns must alternate user, assistant, starting with user")
        name = roles[i % 2]
        if content:
            parts.append(f"{name}: {content}" + ("\n\n" if role == "user" else EOS_TOKEN))
        elif role == "assistant" and i == len(messages) - 1:
            parts.append(f"{name}:")
        else:
            raise ValueError(f"message {i} is empty; only a final assistant message may be empty")
    return "".join(parts)


# The question by which a model judges whether an image shows a description (as VQAScore asks it):
# janus.data.shapes.match_question makes training data for it, and best-of-N generation can rank its
# candidates by the answer (Janus.image_match).
MATCH_QUESTION = "Does the image show {}?"


def generation_prompt(text: str, roles: tuple[str, str]) -> str:
    """Text-to-image prompt: empty system prompt, one user turn, the assistant cue, then `<begin_of_image>`."""
    if not isinstance(text, str) or not text:
        raise ValueError("the image description must be a non-empty string")
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    return render_chat(messages, roles) + BOI_TOKEN


def understanding_prompt(
    question: str, roles: tuple[str, str], num_images: int = 1, system: str = DEFAULT_SYSTEM_PROMPT
) -> str:
    """Single-turn image question: one `<image_placeholder>` line per image, then the question.

    For several turns, put `IMAGE_TOKEN`s into user messages yourself and call `render_chat`.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    content = f"{IMAGE_TOKEN}\n" * num_images + question
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    return render_chat(messages, roles, system)


def expand_image_tokens(
    ids: list[int], tokenizer: Tokenizer, num_image_tokens: int, num_images: int | None = None
) -> list[int]:
    """Replace each `<image_placeholder>` id with `<begin_of_image>`, N placeholders, `<end_of_image>`.

    The N placeholder positions later receive the understanding adaptor's output. Pass `num_images`
    to check that the prompt has exactly one placeholder per image.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    found = sum(1 for i in ids if i == tokenizer.image_id)
    if num_images is not None and found != num_images:
        raise ValueError(f"prompt has {found} {IMAGE_TOKEN} tokens but {num_images} images were given")
    if tokenizer.boi_id in ids or tokenizer.eoi_id in ids:
        raise ValueError(f"prompt already contains {BOI_TOKEN}/{EOI_TOKEN}: were its image tokens expanded twice?")
    image_block = [tokenizer.boi_id, *[tokenizer.image_id] * num_image_tokens, tokenizer.eoi_id]
    expanded = []
    for i in ids:
        expanded.extend(image_block if i == tokenizer.image_id else [i])
    return expanded


def _check_message(message: dict, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
    role, content = message["role"], message["content"]
    if role not in _ROLE_KEYS:
        raise ValueError(f"message {index} has role {role!r}; expected 'user' or 'assistant'")
    if not isinstance(content, str):
        raise TypeError(f"message {index} content must be a str, got {type(content).__name__}")
    return role, content
