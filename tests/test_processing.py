"""Tokenizer, chat template and image processing, checked against transformers' Janus processor.

Everything is built locally: the tiny tokenizers come from janus.testing, images are synthetic.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from janus.processing import (
    DEFAULT_SYSTEM_PROMPT,
    StreamDecoder,
    Tokenizer,
    expand_image_tokens,
    generation_prompt,
    load_image,
    preprocess_generation,
    preprocess_understanding,
    render_chat,
    to_pil,
    understanding_prompt,
)
from janus.processing.tokenizer import SPECIAL_TOKENS
from janus.testing import TINY_VOCAB_SIZE, save_tiny_sentencepiece, save_tiny_tokenizer

PRO_ROLES = ("<|User|>", "<|Assistant|>")
PLAIN_ROLES = ("User", "Assistant")
BOS, EOS = SPECIAL_TOKENS["bos_id"], SPECIAL_TOKENS["eos_id"]

TEXTS = [
    "A small red circle is left of a blue square.",
    "",
    "  leading and trailing spaces,\ttabs\nand\n\nnewlines  ",
    "Numbers 12345 and 3.14, punctuation!?;:",
    f"<|User|>: <image_placeholder>\nWhat colour is the star?\n\n<|Assistant|>: Red.{EOS}",
    "<｜▁pad▁｜><｜▁pad▁｜><begin_of_image><end_of_image>",
    f"{BOS} a BOS written in the text",
    "héllo wörld, naïve café",
    "日本語のテキストと中文",
    "emoji 😀🎨👩‍👩‍👧 and a flag 🇫🇷",
    "<image_placeholder<image_placeholder>>",  # a broken special around a real one
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return save_tiny_sentencepiece(tmp_path_factory.mktemp("tiny_spm"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _random_image(width, height, seed=0):
    """Smooth gradients plus noise: exercises the resampling filters harder than flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = pixels + rng.normal(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ---- tokenizer ----


def test_tiny_tokenizer_vocabulary_and_special_ids(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == TINY_VOCAB_SIZE == len(hf_tokenizer)
    assert [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id] == [0, 1, 2]
    assert [tokenizer.image_id, tokenizer.boi_id, tokenizer.eoi_id] == [3, 4, 5]
    assert tokenizer.bos_id == hf_tokenizer.bos_token_id
    assert tokenizer.eos_id == hf_tokenizer.eos_token_id
    assert tokenizer.pad_id == hf_tokenizer.pad_token_id
    # transformers 5 exposes these from tokenizer_config.json's extra_special_tokens (JanusProcessor needs them)
    assert hf_tokenizer.image_token == "<image_placeholder>"
    assert hf_tokenizer.boi_token == "<begin_of_image>"
    assert hf_tokenizer.eoi_token == "<end_of_image>"


def test_tiny_tokenizer_is_deterministic(tiny_dir, tmp_path):
    again = save_tiny_tokenizer(tmp_path)
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.encode(text, bos=False) == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special=False) == hf_tokenizer.decode(ids) == BOS + text
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_in_text_are_atomic(tokenizer):
    ids = tokenizer.encode(f"a<image_placeholder>b{EOS}", bos=False)
    assert tokenizer.image_id in ids and tokenizer.eos_id in ids
    assert len(ids) == 4


def test_sentencepiece_variant(spm_dir, tokenizer):
    spm = Tokenizer.from_dir(spm_dir)
    assert spm.vocab_size == TINY_VOCAB_SIZE
    ids = {name: getattr(spm, name) for name in SPECIAL_TOKENS}
    assert len(set(ids.values())) == 6 and all(0 <= i < TINY_VOCAB_SIZE for i in ids.values())
    for text in TEXTS:
        encoded = spm.encode(text)
        assert encoded[0] == spm.bos_id
        assert spm.decode(encoded, skip_special=False) == BOS + text
        assert spm.decode(encoded) == tokenizer.decode(tokenizer.encode(text))  # same text once specials drop
    encoded = spm.encode(f"x<image_placeholder><｜▁pad▁｜>{EOS}", bos=False)
    assert encoded[1:] == [spm.image_id, spm.pad_id, spm.eos_id]


@pytest.mark.parametrize("which", ["tiny_dir", "spm_dir"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_stream_decoder_never_splits_characters(request, which, skip_special):
    tokenizer = Tokenizer.from_dir(request.getfixturevalue(which))
    ids = tokenizer.encode(f"héllo 日本語 😀🎨 👩‍👩‍👧{EOS} naïve <image_placeholder>!")
    stream = StreamDecoder(tokenizer, skip_special=skip_special)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special=skip_special)
    assert not any("\ufffd" in piece for piece in pieces)  # partial characters were held back


def test_stream_decoder_flushes_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 😀", bos=False)
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids[:-1]]  # the emoji's last byte never arrives
    assert "".join(pieces) == "ok "
    assert stream.flush() == tokenizer.decode(ids[:-1])[len("ok ") :]


def test_tokenizer_errors(tmp_path, tokenizer):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="image_placeholder"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TypeError):
        tokenizer.encode(["not", "a", "string"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([TINY_VOCAB_SIZE])


# ---- chat template ----


def test_render_chat_multi_turn_pro_roles_with_system():
    messages = [
        {"role": "user", "content": "<image_placeholder>\nWhat is this?"},
        {"role": "assistant", "content": "A red star."},
        {"role": "user", "content": "And its size?"},
        {"role": "assistant", "content": ""},
    ]
    expected = (
        "SYS\n\n"
        "<|User|>: <image_placeholder>\nWhat is this?\n\n"
        "<|Assistant|>: A red star.<｜end▁of▁sentence｜>"
        "<|User|>: And its size?\n\n"
        "<|Assistant|>:"
    )
    assert render_chat(messages, PRO_ROLES, system="SYS") == expected


def test_render_chat_plain_roles_without_system():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert render_chat(messages, PLAIN_ROLES) == "User: Hi\n\nAssistant: Hello.<｜end▁of▁sentence｜>"


def test_generation_and_understanding_prompts():
    assert generation_prompt("a red star", PRO_ROLES) == "<|User|>: a red star\n\n<|Assistant|>:<begin_of_image>"
    assert generation_prompt("a red star", PLAIN_ROLES) == "User: a red star\n\nAssistant:<begin_of_image>"
    assert DEFAULT_SYSTEM_PROMPT == (
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language."
    )
    assert understanding_prompt("Compare.", PRO_ROLES, num_images=2) == (
        DEFAULT_SYSTEM_PROMPT + "\n\n<|User|>: <image_placeholder>\n<image_placeholder>\nCompare.\n\n<|Assistant|>:"
    )
    assert understanding_prompt("Why?", PLAIN_ROLES, system="") == "User: <image_placeholder>\nWhy?\n\nAssistant:"


@pytest.mark.parametrize(
    "messages, error",
    [
        ([], ValueError),
        ([{"role": "assistant", "content": "hi"}], ValueError),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ValueError),
        ([{"role": "system", "content": "a"}], ValueError),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], ValueError),
        ([{"role": "user", "content": 3}], TypeError),
        (["just a string"], ValueError),
    ],
)
def test_render_chat_rejects_bad_messages(messages, error):
    with pytest.raises(error):
        render_chat(messages, PRO_ROLES)


def test_render_chat_rejects_bad_roles():
    with pytest.raises(ValueError, match="roles"):
        render_chat([{"role": "user", "content": "hi"}], ("User",))


# ---- against transformers' JanusProcessor ----

NUM_IMAGE_TOKENS = 4
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def janus_processor(hf_tokenizer):
    from transformers import JanusImageProcessor, JanusProcessor

    image_processor = JanusImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return JanusProcessor(
        image_processor=image_processor,
        tokenizer=hf_tokenizer,
        num_image_tokens=NUM_IMAGE_TOKENS,
        use_default_system_prompt=True,
    )


@pytest.mark.parametrize("num_images", [1, 2])
def test_understanding_ids_match_janus_processor(tokenizer, janus_processor, num_images):
    images = [_random_image(40, 24, seed=1), _random_image(17, 33, seed=2)][:num_images]
    question = "What colour is the star?"
    ids = expand_image_tokens(
        tokenizer.encode(understanding_prompt(question, PRO_ROLES, num_images)),
        tokenizer,
        NUM_IMAGE_TOKENS,
        num_images=num_images,
    )
    # The processor prepends DEFAULT_SYSTEM_PROMPT + "\n\n" itself: give it the prompt without a system part.
    reference = janus_processor(text=understanding_prompt(question, PRO_ROLES, num_images, system=""), images=images)
    assert ids == reference["input_ids"][0].tolist()
    assert ids.count(tokenizer.image_id) == num_images * NUM_IMAGE_TOKENS
    pixels = preprocess_understanding(images, IMAGE_SIZE)
    assert pixels.shape == reference["pixel_values"].shape
    assert torch.allclose(pixels, reference["pixel_values"], atol=3.5 / 127.5)  # torchvision resize rounding


def test_generation_ids_match_janus_processor(tokenizer, janus_processor):
    text = render_chat([{"role": "user", "content": "a red star"}, {"role": "assistant", "content": ""}], PRO_ROLES)
    reference = janus_processor(text=text, generation_mode="image")["input_ids"][0].tolist()
    assert tokenizer.encode(generation_prompt("a red star", PRO_ROLES)) == reference
    assert reference[-1] == tokenizer.boi_id


def test_expand_image_tokens_errors(tokenizer):
    ids = tokenizer.encode(understanding_prompt("Why?", PRO_ROLES, num_images=2))
    with pytest.raises(ValueError, match="2 <image_placeholder> tokens but 1 images"):
        expand_image_tokens(ids, tokenizer, NUM_IMAGE_TOKENS, num_images=1)
    with pytest.raises(ValueError, match="num_image_tokens"):
        expand_image_tokens(ids, tokenizer, 0)
    expanded = expand_image_tokens(ids, tokenizer, NUM_IMAGE_TOKENS)
    with pytest.raises(ValueError, match="expanded twice"):
        expand_image_tokens(expanded, tokenizer, NUM_IMAGE_TOKENS)


# ---- images ----

ASPECTS = [(640, 480), (480, 640), (384, 384), (1000, 200), (200, 1000), (37, 91), (50, 50), (1200, 5)]


@pytest.mark.parametrize("size", [384, 32])
def test_preprocess_understanding_matches_transformers(size):
    from transformers import JanusImageProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    settings = dict(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images = [_random_image(w, h, seed=i) for i, (w, h) in enumerate(ASPECTS)]
    ours = preprocess_understanding(images, size)
    assert ours.shape == (len(ASPECTS), 3, size, size) and ours.dtype == torch.float32
    for i, image in enumerate(images):
        # PIL backend: identical pipeline (PIL bicubic resize, same rounding of the resized size).
        pil_reference = JanusImageProcessorPil(**settings)(images=[image], return_tensors="pt").pixel_values[0]
        assert torch.allclose(ours[i], pil_reference, atol=1e-6)
        # torchvision backend (the default): its antialiased bicubic on uint8 rounds differently.
        # Measured max 3 uint8 levels (0.0235), mean below 1e-3.
        torch_reference = JanusImageProcessor(**settings)(images=[image], return_tensors="pt").pixel_values[0]
        difference = (ours[i] - torch_reference).abs()
        assert difference.max() <= 3.5 / 127.5 and difference.mean() < 1e-3


def test_preprocess_understanding_pads_with_grey_and_converts_modes():
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    pixels = preprocess_understanding([wide], 32)[0]
    assert torch.allclose(pixels[:, 0, 0], torch.full((3,), 127 / 127.5 - 1))  # top band: grey canvas
    assert torch.allclose(pixels[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))  # centre: the image
    rgb = _random_image(30, 20)
    for mode in ("RGBA", "L", "P"):
        converted = rgb.convert(mode)
        expected = preprocess_understanding([converted.convert("RGB")], 32)
        assert torch.equal(preprocess_understanding([converted], 32), expected)


def test_preprocess_generation_crops_the_centre():
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (15, 0, 45, 30))  # white middle square, black side bands
    pixels = preprocess_generation(image, 30)
    assert pixels.shape == (3, 30, 30)
    assert torch.equal(pixels, torch.ones(3, 30, 30))  # the bands are cropped away
    resized = preprocess_generation(_random_image(100, 70), 24)
    assert resized.shape == (3, 24, 24) and resized.min() >= -1 and resized.max() <= 1


def test_to_pil_known_values_and_round_trip():
    values = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    images = to_pil(values)
    assert len(images) == 2 and images[0].size == (6, 1) and images[0].mode == "RGB"
    # clip((x + 1) / 2 * 255, 0, 255) then cast (truncation): 0 -> 127.5 -> 127, 0.5 -> 191.25 -> 191
    assert np.asarray(images[1])[0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]
    original = _random_image(16, 16)
    back = np.asarray(to_pil(preprocess_generation(original, 16)[None])[0]).astype(int)
    # float32 (x / 127.5 - 1) then truncation can lose one level on some values, never more.
    assert np.abs(back - np.asarray(original).astype(int)).max() <= 1


def test_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(garbage)
    with pytest.raises(TypeError):
        load_image(42)
    with pytest.raises(ValueError, match="shape"):
        to_pil(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError):
        preprocess_understanding([np.zeros((8, 8, 3))], 32)
    with pytest.raises(ValueError, match="non-empty list"):
        preprocess_understanding([], 32)
    with pytest.raises(ValueError, match="size"):
        preprocess_generation(Image.new("RGB", (8, 8)), 0)


def test_load_image_returns_rgb(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (5, 4), (10, 20, 30, 40)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert image.getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("L", (3, 3), 9)).getpixel((1, 1)) == (9, 9, 9)
