"""`janus.load()` and the user-facing `Janus` object: image generation and chat."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import CheckpointError, load_model
from .models.unified import JanusModel
from .processing.chat import DEFAULT_SYSTEM_PROMPT, MATCH_QUESTION, expand_image_tokens, generation_prompt, render_chat
from .processing.image import load_image, preprocess_understanding, to_pil
from .processing.tokenizer import IMAGE_TOKEN, StreamDecoder, Tokenizer
from .sampling import DEFAULT_CFG_WEIGHT, DEFAULT_TEMPERATURE, Sampling, generate_image_codes, generate_text, image_step

ImageInput = str | Path | Image.Image
# The built-in default model ships inside the package (docs/default_model.md).
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
# Sampling defaults of a checkpoint, as transformers keeps them: `guidance_scale` (the CFG weight) and
# `temperature` of image generation.
GENERATION_CONFIG = "generation_config.json"
# How best-of-N generation picks among candidates by name (Janus.generate_image_tokens), besides a
# judge of the caller's: a function (prompt, images) -> one score per image, higher better.
RANKINGS = ("likelihood", "match")
Judge = Callable[[str, list[Image.Image]], torch.Tensor]
# The answers image_match weighs, in both cases, as models trained on human data write them.
YES_ANSWERS, NO_ANSWERS = ("yes", "Yes"), ("no", "No")


class ChatStream(Iterator[str]):
    """The text pieces of an answer as the model produces them. Once they are exhausted,
    `finish_reason` says why the answer ended: "stop" (the model ended it) or "length"
    (`max_new_tokens` or the model's context ran out); before that it is None.
    `prompt_tokens` counts the prompt (image tokens included), `completion_tokens` the tokens
    generated so far (EOS included)."""

    def __init__(self, ids: Iterator[int], prompt_tokens: int, tokenizer: Tokenizer, on_close: Callable[[], None]) -> None:
        self.finish_reason: str | None = None
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self._pieces = self._decode(ids, tokenizer, on_close)

    def _decode(self, ids: Iterator[int], tokenizer: Tokenizer, on_close: Callable[[], None]) -> Iterator[str]:
        decoder = StreamDecoder(tokenizer)
        try:
            for token_id in ids:
                self.completion_tokens += 1
                if token_id == tokenizer.eos_id:
                    self.finish_reason = "stop"
                    break
                piece = decoder.push(token_id)
                if piece:
                    yield piece
            else:
                self.finish_reason = "length"
        finally:
            on_close()
        tail = decoder.flush()
        if tail:
            yield tail

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (what was not yet produced is never computed) and free the model's cache."""
        self._pieces.close()


class Janus:
    """A loaded model with its tokenizer: text-to-image generation and multimodal chat.

    `default_cfg_weight` and `default_temperature` are the image generation settings of calls that name
    none."""

    def __init__(
        self,
        model: JanusModel,
        tokenizer: Tokenizer,
        compile: bool | None = None,
        default_cfg_weight: float = DEFAULT_CFG_WEIGHT,
        default_temperature: float = DEFAULT_TEMPERATURE,
    ):
        if tokenizer.vocab_size > model.cfg.decoder.vocab_size:
            raise CheckpointError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {model.cfg.decoder.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.default_cfg_weight = default_cfg_weight
        self.default_temperature = default_temperature
        self.device = model.decoder.embed_tokens.weight.device
        # On CUDA the one-token step is compiled and captured as a CUDA graph; it then reads the whole
        # cache each step so its shapes never change.
        self.compiled = self.device.type == "cuda" if compile is None else compile
        self._step = torch.compile(image_step, mode="reduce-overhead", fullgraph=True) if self.compiled else image_step

    # ------------------------------------------------------------ generation

    def image_settings(self, cfg_weight: float | None = None, temperature: float | None = None) -> tuple[float, float]:
        """(cfg_weight, temperature) of an image call, None meaning the model's default."""
        return (
            self.default_cfg_weight if cfg_weight is None else cfg_weight,
            self.default_temperature if temperature is None else temperature,
        )

    def generate_image_tokens(
        self,
        prompt: str | Sequence[str],
        n: int = 1,
        cfg_weight: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        progress: bool = False,
        batch_size: int | None = None,
        candidates: int = 1,
        rank_by: str | Judge = "likelihood",
    ) -> torch.Tensor:
        """VQ codes [len(prompts) * n, num_image_tokens], n per prompt in prompt order.

        `cfg_weight` and `temperature` None mean `default_cfg_weight` and `default_temperature`.
        `batch_size` caps how many images run at once (default: as many as fit in memory).
        `candidates` > 1 draws that many images for each one returned, at that many times the cost, and
        keeps the best by `rank_by`: "likelihood", its codes' conditional log-likelihood under the model
        (`image_loglik`), or "match", the model's own judgement that the image shows the prompt
        (`image_match`; it needs a model trained to answer that question, which the built-in one is not),
        or a judge function (prompt, images) -> scores [len(images)] such as
        `janus.eval.clause_judge.clause_judge(model)`.
        """
        return self._draw(prompt, n, cfg_weight, temperature, top_k, top_p, seed, progress, batch_size, candidates, rank_by)[0]

    def _draw(
        self, prompt: str | Sequence[str], n: int = 1, cfg_weight: float | None = None, temperature: float | None = None,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, progress: bool = False,
        batch_size: int | None = None, candidates: int = 1, rank_by: str | Judge = "likelihood",
    ) -> tuple[torch.Tensor, list[Image.Image] | None]:
        """`generate_image_tokens`'s codes, and the kept images where a judge has already decoded them
        (so that `generate_image` does not decode them twice); None otherwise."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
        if not callable(rank_by) and rank_by not in RANKINGS:
            raise ValueError(f"rank_by must be one of {RANKINGS} or a function (prompt, images) -> scores, got {rank_by!r}")
        cfg_weight, temperature = self.image_settings(cfg_weight, temperature)
        if not cfg_weight >= 0:
            raise ValueError(f"cfg_weight must be >= 0, got {cfg_weight}")
        sampling = Sampling(temperature, top_k, top_p)
        sampling.validate()
        encoded = [self.tokenizer.encode(generation_prompt(p, self.cfg.roles)) for p in prompts]
        rows = [row for row in encoded for _ in range(n * candidates)]
        longest = max(map(len, rows)) + self.cfg.vq.num_tokens
        if longest > self.cfg.decoder.max_seq_len:
            raise ValueError(f"prompt too long: {longest} positions with the image, the model allows {self.cfg.decoder.max_seq_len}")
        chunk = batch_size or self._images_per_batch(longest, cfg_weight != 1)
        by_likelihood = candidates > 1 and rank_by == "likelihood"  # the sampler scores as it draws
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        bar = tqdm(total=len(rows) * self.cfg.vq.num_tokens, unit="tok", disable=not progress, desc="generating")
        codes, loglik = [], []
        with bar:
            try:
                for start in range(0, len(rows), chunk):
                    batch = rows[start : start + chunk]
                    result = generate_image_codes(
                        self.model, batch, self.tokenizer.pad_id, cfg_weight, sampling, generator,
                        step_fn=self._step, static_cache_reads=self.compiled, on_step=lambda k=len(batch): bar.update(k),
                        with_loglik=by_likelihood,
                    )
                    if by_likelihood:
                        result, chunk_loglik = result
                        loglik.append(chunk_loglik)
                    codes.append(result)
            finally:
                if not self.compiled:  # a compiled step must keep seeing the same buffers
                    self.model.decoder.drop_cache("image")
        codes = torch.cat(codes)
        if candidates == 1:
            return codes, None
        images = None
        if by_likelihood:
            scores = torch.cat(loglik)
        else:
            judge = self.image_match if rank_by == "match" else rank_by
            per_prompt = n * candidates
            scores, images = [], []
            for i, p in enumerate(prompts):
                drawn = self.decode_image_tokens(codes[i * per_prompt : (i + 1) * per_prompt])
                judged = torch.as_tensor(judge(p, drawn))
                if judged.shape != (per_prompt,):
                    raise ValueError(f"rank_by must give one score per image: {per_prompt} images, got shape {list(judged.shape)}")
                scores.append(judged.float())
                images += drawn
            scores = torch.cat(scores)
        # Rows come in runs of `candidates` for the same image; keep each run's best.
        best = scores.to(codes.device).view(-1, candidates).argmax(1)
        kept = (best + torch.arange(len(best), device=best.device) * candidates).tolist()
        return codes[kept], None if images is None else [images[i] for i in kept]

    def generate_image(self, prompt: str | Sequence[str], n: int = 1, **kwargs) -> list[Image.Image]:
        """n images per prompt (same keyword arguments as `generate_image_tokens`)."""
        codes, images = self._draw(prompt, n, **kwargs)
        return self.decode_image_tokens(codes) if images is None else images

    @torch.no_grad()
    def decode_image_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        """VQ codes [B, num_image_tokens] -> B PIL images."""
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        images = []
        for start in range(0, len(tokens), 8):  # the VQ decoder's activations are large at full size
            images += to_pil(self.model.vq.decode(tokens[start : start + 8]).float())
        return images

    @torch.no_grad()
    def image_loglik(self, prompt: str, codes: torch.Tensor) -> torch.Tensor:
        """Each row's log-likelihood of its VQ codes [B, num_image_tokens] given `prompt`, under the
        conditional logits (no guidance, temperature 1), float32 [B]: the score `rank_by="likelihood"`
        ranks by, here computed teacher-forced."""
        codes = torch.as_tensor(codes, device=self.device)
        if codes.dim() != 2 or codes.shape[1] != self.cfg.vq.num_tokens:
            raise ValueError(f"codes must have shape [B, {self.cfg.vq.num_tokens}], got {list(codes.shape)}")
        text = torch.tensor(self.tokenizer.encode(generation_prompt(prompt, self.cfg.roles)), device=self.device)
        tokens = torch.cat([text.expand(len(codes), -1), codes], 1)
        code_mask = torch.arange(tokens.shape[1], device=self.device) >= len(text)
        hidden = self.model(tokens, code_mask=code_mask.expand_as(tokens))[:, len(text) - 1 : -1]
        logp = self.model.image_logits(hidden).float().log_softmax(-1)
        return logp.gather(2, codes[..., None])[..., 0].sum(1).cpu()

    def image_match(self, prompt: str, images: Sequence[ImageInput], batch_size: int = 16) -> torch.Tensor:
        """The model's judgement of whether each image shows `prompt`: log P(yes) - log P(no) of its
        answer to MATCH_QUESTION (a VQAScore-style question), float32 [len(images)]; > 0 means yes.
        Each answer's probability sums its writings in YES_ANSWERS / NO_ANSWERS."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        logp = self.answer_logprobs(MATCH_QUESTION.format(prompt), [*YES_ANSWERS, *NO_ANSWERS], images, batch_size)
        return logp[:, : len(YES_ANSWERS)].logsumexp(1) - logp[:, len(YES_ANSWERS) :].logsumexp(1)

    @torch.no_grad()
    def answer_logprobs(self, question: str, answers: Sequence[str], images: Sequence[ImageInput], batch_size: int = 16) -> torch.Tensor:
        """log P(answer | image, question) for each image and answer, float32 [len(images), len(answers)].

        Each answer is scored whole, teacher-forced after the chat prompt that asks `question` about one
        image, as " " + answer (a tokenizer may split a word into pieces); the end of the answer is not
        scored, so this is the probability that the reply starts with it."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError("answers must be a non-empty list of non-empty strings")
        images = [load_image(im) for im in images]
        if not images:
            raise ValueError("answer_logprobs needs at least one image")
        tokens, _ = self._chat_inputs([{"role": "user", "content": question, "images": images[:1]}])
        asked = tokens.shape[1]
        answer_ids = [torch.tensor(self.tokenizer.encode(f" {a}", bos=False), device=self.device) for a in answers]
        if asked + max(map(len, answer_ids)) > self.cfg.decoder.max_seq_len:
            raise ValueError(f"question too long: it and an answer take more than the model's {self.cfg.decoder.max_seq_len} positions")
        # One row per image: the question, then every answer after it. Each answer sees the question and
        # its own earlier tokens and sits at the positions it would have alone, so one pass scores all
        # answers exactly as separate rows would, at the cost of the question once.
        row = torch.cat([tokens[0], *answer_ids])
        owner = torch.cat([torch.full((asked,), -1, device=self.device), *(torch.full_like(ids, j) for j, ids in enumerate(answer_ids))])
        positions = torch.cat([torch.arange(asked, device=self.device), *(asked + torch.arange(len(ids), device=self.device) for ids in answer_ids)])
        slot = torch.arange(len(row), device=self.device)
        visible = (slot[None, :] <= slot[:, None]) & ((owner[None, :] == -1) | (owner[None, :] == owner[:, None]))
        # Each answer token is predicted by its previous token, an answer's first by the question's end.
        predictor = slot[asked:] - 1
        first = torch.tensor([0, *map(len, answer_ids[:-1])], device=self.device).cumsum(0)
        predictor[first] = asked - 1
        targets, answer_of = torch.cat(answer_ids), owner[asked:]
        image_mask = row == self.tokenizer.image_id
        scores = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = preprocess_understanding(chunk, self.cfg.vision.image_size).to(self.device)
            n = len(chunk)
            hidden = self.model(row.expand(n, -1), image_mask.expand(n, -1), pixels, positions=positions.expand(n, -1), mask=visible.expand(n, 1, -1, -1))
            # The head runs on the predicting positions only: at a large vocabulary, all logits are gigabytes.
            logp = self.model.text_logits(hidden[:, predictor])[..., : self.tokenizer.vocab_size].float().log_softmax(-1)
            token_logp = logp.gather(2, targets.expand(n, -1)[..., None])[..., 0]
            scores.append(token_logp.new_zeros(n, len(answers)).index_add_(1, answer_of, token_logp))
        return torch.cat(scores).cpu()

    def _images_per_batch(self, seq_len: int, guided: bool) -> int:
        """Images per batch such that their KV cache takes at most half the free accelerator memory."""
        if self.device.type != "cuda":
            return 16
        dec = self.cfg.decoder
        itemsize = self.model.decoder.embed_tokens.weight.element_size()
        per_row = 2 * dec.n_layers * dec.n_kv_heads * dec.head_dim * seq_len * itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, math.floor(free / 2 / (per_row * (2 if guided else 1))))

    # ------------------------------------------------------------ chat

    def chat(
        self,
        message: str,
        images: Sequence[ImageInput] | None = None,
        history: Sequence[dict] | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> str | ChatStream:
        """Answer `message` about `images`, after earlier turns in `history`.

        history: `{"role": "user"|"assistant", "content": str, "images": [...]}` dicts, alternating from
        a user turn (images optional). A message without `<image_placeholder>` gets one per image
        in front. History may start with `{"role": "system", "content": str}`, the system prompt;
        without one, Janus's own is used when the conversation has images, none otherwise.
        The answer ends at EOS, after `max_new_tokens`, or at the end of the model's context.
        Returns the answer, or with `stream=True` a `ChatStream`: an iterator of text pieces that says
        why the answer ended once it is exhausted.
        """
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message must be a non-empty string")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        sampling = Sampling(temperature, None, top_p)
        sampling.validate()
        turns = [*(history or []), {"role": "user", "content": message, "images": list(images or [])}]
        tokens, pixels = self._chat_inputs(turns)
        room = self.cfg.decoder.max_seq_len - tokens.shape[1]
        if room < 1:
            raise ValueError(
                f"conversation too long: {tokens.shape[1]} prompt tokens fill the model's {self.cfg.decoder.max_seq_len} positions"
            )
        max_new_tokens = min(max_new_tokens, room)  # a cap: the answer stops at the context's end
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        ids = generate_text(
            self.model, tokens, tokens == self.tokenizer.image_id, pixels, max_new_tokens,
            self.tokenizer.eos_id, sampling, generator, self.tokenizer.vocab_size,
        )
        pieces = ChatStream(ids, tokens.shape[1], self.tokenizer, lambda: self.model.decoder.drop_cache("text"))
        return pieces if stream else "".join(pieces)

    def _chat_inputs(self, turns: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
        system = None
        if isinstance(turns[0], dict) and turns[0].get("role") == "system":
            system = turns[0].get("content")
            if not isinstance(system, str) or turns[0].get("images"):
                raise ValueError("the system turn must have string content and no images")
        messages, images = [], []
        first = int(system is not None)
        for i, turn in enumerate(turns[first:], start=first):
            if not isinstance(turn, dict):
                raise ValueError(f"history entry {i} must be a dict with 'role' and 'content'")
            turn_images = [load_image(im) for im in turn.get("images") or []]
            content = turn.get("content", "")
            if turn_images and IMAGE_TOKEN not in content:
                content = f"{IMAGE_TOKEN}\n" * len(turn_images) + content
            if content.count(IMAGE_TOKEN) != len(turn_images):
                raise ValueError(f"turn {i} has {content.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {len(turn_images)} images")
            messages.append({"role": turn.get("role"), "content": content})
            images += turn_images
        messages.append({"role": "assistant", "content": ""})
        if system is None:
            system = DEFAULT_SYSTEM_PROMPT if images else ""
        ids = self.tokenizer.encode(render_chat(messages, self.cfg.roles, system))
        ids = expand_image_tokens(ids, self.tokenizer, self.cfg.vision.num_patches, len(images))
        tokens = torch.tensor([ids], device=self.device)
        if not images:
            return tokens, None
        pixels = preprocess_understanding(images, self.cfg.vision.image_size).to(self.device)
        return tokens, pixels


def load(
    path: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    compile: bool | None = None,
) -> Janus:
    """Load a checkpoint directory (official, transformers or native layout) with its tokenizer.

    `path=None` loads the built-in default model. device/dtype "auto": CUDA and bfloat16 when a GPU
    is present, else CPU and float32. `compile` compiles the image-token step with torch.compile
    (default: on CUDA only; on CPU it needs a C++ compiler and pays a one-off compile per shape).
    The guidance weight and temperature of image generation calls that name none are the checkpoint's
    `guidance_scale` and `temperature` in generation_config.json when it has them, else 5 and 1.
    """
    if path is None:
        path = DEFAULT_MODEL_DIR
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"the built-in default model is missing from this installation ({path}); rebuild it with "
                "`python stages/build_default_model.py --install`, or pass a checkpoint directory or set JANUS_MODEL"
            )
    model = load_model(path, device, dtype)
    try:
        tokenizer = Tokenizer.from_dir(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {path}: {e}") from None
    cfg_weight, temperature = read_image_defaults(path)
    return Janus(model, tokenizer, compile, cfg_weight, temperature)


def read_image_defaults(path: str | Path) -> tuple[float, float]:
    """The CFG weight and temperature a checkpoint directory asks image generation to use: its
    generation_config.json's `guidance_scale` and `temperature`, else the Janus defaults."""
    file = Path(path) / GENERATION_CONFIG
    if not file.is_file():
        return DEFAULT_CFG_WEIGHT, DEFAULT_TEMPERATURE
    try:
        settings = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{file} must hold a JSON object")

    def setting(key: str, default: float) -> float:
        value = settings.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
            raise CheckpointError(f"{file}: {key} must be a number >= 0, got {value!r}")
        return float(value)

    return setting("guidance_scale", DEFAULT_CFG_WEIGHT), setting("temperature", DEFAULT_TEMPERATURE)


_default: Janus | None = None


def default_model() -> Janus:
    """The model behind the module-level API: $JANUS_MODEL if set, else the built-in one (loaded once)."""
    global _default
    if _default is None:
        _default = load(os.environ.get("JANUS_MODEL") or None)
    return _default


def generate_image(prompt: str | Sequence[str], **kwargs) -> list[Image.Image]:
    """Generate images with the default model; see `Janus.generate_image`."""
    return default_model().generate_image(prompt, **kwargs)


def chat(message: str, **kwargs) -> str | ChatStream:
    """Chat with the default model; see `Janus.chat`."""
    return default_model().chat(message, **kwargs)
