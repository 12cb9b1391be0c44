"""Tiny, deterministic tokenizers for tests and toy training runs, built offline.

Both carry the DeepSeek special tokens (DESIGN.md §2) so the processing code and transformers' Janus
processor can be exercised without downloading anything. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path

# The tiny model preset's vocab_size: ids must never exceed its embedding table.
TINY_VOCAB_SIZE = 512

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
_SIZES = ("small", "large")
_PLACES = ("left of", "right of", "above", "below")
_COUNTS = ("one", "two", "three", "four", "five")
_CORNERS = ("top left", "top right", "bottom left", "bottom right")


def tiny_corpus() -> list[str]:
    """A fixed English corpus about coloured shapes, chat turns and simple questions and answers."""
    lines = []
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            size = _SIZES[(i + j) % len(_SIZES)]
            other_colour = _COLOURS[(i + 3) % len(_COLOURS)]
            other_shape = _SHAPES[(j + 1) % len(_SHAPES)]
            place = _PLACES[(i * j) % len(_PLACES)]
            count = _COUNTS[(i + 2 * j) % len(_COUNTS)]
            corner = _CORNERS[(i + j) % len(_CORNERS)]
            grid = 2 + (i + j) % 7
            lines += [
                f"A {size} {colour} {shape} is {place} a {other_colour} {other_shape}.",
                f"<|User|>: What colour is the {shape}?\n\n<|Assistant|>: The {shape} is {colour}.",
                f"User: How many {colour} shapes are there?\n\nAssistant: There are {count}.",
                f"Question: Where is the {colour} {shape}? Answer: It is {place} the {other_shape}.",
                f"Draw {count} {size} {colour} {shape}s on a grey background.",
                f"Describe the picture. The image shows a {colour} {shape} in the {corner} corner of a "
                f"{grid}x{grid} grid, next to {count} smaller {other_colour} shapes.",
                f"Is there a {colour} {shape} in this image? {'Yes' if (i + j) % 2 else 'No'}, "
                f"{'there is exactly one' if (i + j) % 2 else 'there is not'}.",
            ]
    lines.append(
        "You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language."
    )
    return lines


def save_tiny_tokenizer(directory: str | Path) -> Path:
    """Write a byte-level BPE tokenizer with exactly TINY_VOCAB_SIZE tokens in the Hugging Face layout.

    Loads with our `Tokenizer.from_dir` and with `transformers.AutoTokenizer`; both prepend BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from janus.processing.tokenizer import BOI_TOKEN, BOS_TOKEN, EOI_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN
    from janus.processing.tokenizer import SPECIAL_TOKENS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),  # ids 0..5: BOS, EOS, pad, image, BOI, EOI
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tokenizer.get_vocab_size()} tokens, expected {TINY_VOCAB_SIZE}")
    # The DeepSeek tokenizer prepends BOS in its post-processor.
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))

    # transformers 5 exposes the named entries of a dict `extra_special_tokens` as attributes
    # (tokenizer.image_token, .boi_token, .eoi_token), which JanusProcessor reads.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return directory


def save_tiny_sentencepiece(directory: str | Path) -> Path:
    """Write `tokenizer.model`: a sentencepiece BPE model of TINY_VOCAB_SIZE pieces with the special tokens."""
    from .processing.tokenizer import train_sentencepiece

    return train_sentencepiece(tiny_corpus(), directory, TINY_VOCAB_SIZE)


def randomize(model, seed: int = 0) -> None:
    """Weights far from init defaults (norm scales near 1, the rest N(0, 0.2)), so tests of equality
    cannot pass by symmetry and tiny models produce varied, not collapsed, token sequences."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                mean = 1.0 if "norm" in name else 0.0
                p.copy_(mean + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def steer_eos(pipe, towards: bool) -> None:
    """Make a loaded model's text head pick EOS at every answer step (or never), by a wide margin: a
    large first feature in every token embedding dominates the residual stream, and the head's EOS
    row reads only that feature."""
    import torch

    decoder, eos = pipe.model.decoder, pipe.tokenizer.eos_id
    with torch.no_grad():
        decoder.embed_tokens.weight[:, 0] = 1000.0
        decoder.norm.weight[0] = 1.0
        decoder.lm_head.weight[eos] = 0.0
        decoder.lm_head.weight[eos, 0] = 10.0 if towards else -10.0


def cache_buffers(pipe) -> list[tuple[int, int]]:
    """Addresses of each decoder layer's key and value cache buffers: what a recorded CUDA graph reads."""
    return [(layer.self_attn.cache.k.data_ptr(), layer.self_attn.cache.v.data_ptr()) for layer in pipe.model.decoder.layers]


def save_tiny_checkpoint(directory: str | Path, seed: int = 0, layout: str = "native", **decoder_overrides) -> Path:
    """A random-weight model of the `tiny` preset with the tiny tokenizer, saved in `layout`."""
    import dataclasses
    import tempfile

    from .checkpoint import save_model
    from .models.config import JanusConfig
    from .models.unified import JanusModel

    cfg = JanusConfig.preset("tiny")
    cfg.decoder = dataclasses.replace(cfg.decoder, **decoder_overrides)
    model = JanusModel(cfg).eval()
    randomize(model, seed)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        save_tiny_tokenizer(tokenizer_dir)
        image_id = 3  # <image_placeholder> in the tiny vocabulary
        return save_model(model, directory, layout, extra_files_from=tokenizer_dir, image_token_id=image_id)


TOY_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def write_toy_dataset(directory: str | Path) -> dict[str, list[str]]:
    """A handful of records of each kind (understanding, text, generation) about coloured squares,
    32 px images; returns kind -> manifest paths."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[dict]] = {"understanding": [], "text": [], "generation": []}
    for name, rgb in TOY_COLOURS.items():
        image = Image.new("RGB", (32, 32), (127, 127, 127))
        image.paste(rgb, (8, 8, 24, 24))
        image.save(directory / f"{name}.png")
        question = {"role": "user", "content": "<image_placeholder>\nWhat colour is the square?"}
        answer = {"role": "assistant", "content": f"It is {name}."}
        lines["understanding"].append({"kind": "understanding", "images": [f"{name}.png"], "conversation": [question, answer]})
        lines["text"].append({"kind": "text", "text": f"A {name} square sits in the middle of a grey picture."})
        lines["generation"].append({"kind": "generation", "caption": f"a {name} square", "image": f"{name}.png"})
    manifests = {}
    for kind, records in lines.items():
        path = directory / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        manifests[kind] = [str(path)]
    return manifests


def make_tiny_run(root: str | Path) -> Path:
    """What configs/tiny.yaml expects under its root: the toy data set and a random stage-0 model."""
    root = Path(root)
    write_toy_dataset(root / "data")
    save_tiny_checkpoint(root / "stage0" / "export")
    return root
