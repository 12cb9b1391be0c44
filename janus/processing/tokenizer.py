"""Text tokenizer: a thin wrapper over a `tokenizers` tokenizer.json or a sentencepiece tokenizer.model.

transformers is deliberately not imported here: it is slow to import and adds nothing for encoding.
Special token ids differ between checkpoints, so they are looked up in the vocabulary (DESIGN.md §2).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
SPECIAL_TOKENS = {
    "bos_id": BOS_TOKEN,
    "eos_id": EOS_TOKEN,
    "pad_id": PAD_TOKEN,
    "image_id": IMAGE_TOKEN,
    "boi_id": BOI_TOKEN,
    "eoi_id": EOI_TOKEN,
}


class Tokenizer:
    """Encodes text to ids and back; `from_dir` picks the backend from the files present."""

    bos_id: int
    eos_id: int
    pad_id: int
    image_id: int
    boi_id: int
    eoi_id: int

    def __init__(self, backend: _HFBackend | _SentencePieceBackend) -> None:
        self._backend = backend
        vocab = backend.vocab()
        missing = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the special tokens {missing}")
        for attribute, token in SPECIAL_TOKENS.items():
            setattr(self, attribute, vocab[token])
        self.special_ids = frozenset(vocab[token] for token in SPECIAL_TOKENS.values())
        self.vocab_size = len(vocab)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (preferred) or a sentencepiece `tokenizer.model` from a directory."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(_HFBackend(path / "tokenizer.json"))
        if (path / "tokenizer.model").is_file():
            return cls(_SentencePieceBackend(path / "tokenizer.model"))
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first unless `bos=False`. Special tokens in the text stay whole."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`. Unless `skip_special=False`, special tokens are dropped: the six Janus ones
        and any others the tokenizer file marks special."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of size {self.vocab_size}")
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._backend.decode(ids, skip_special)


def train_sentencepiece(texts: Iterable[str], directory: str | Path, vocab_size: int) -> Path:
    """Train a sentencepiece BPE `tokenizer.model` on `texts` into `directory`, with the special tokens.

    The specials are user-defined symbols rather than control symbols, so they are parsed atomically
    from text (the chat template writes EOS after every assistant turn). Byte fallback keeps any text
    encodable, and no normalisation or dummy prefix is applied, so text round-trips exactly.
    """
    import io

    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()  # rather than model_prefix, which would record the directory in the file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        user_defined_symbols=list(SPECIAL_TOKENS.values()),
        unk_id=0,
        bos_id=-1,  # BOS/EOS/pad are the user-defined DeepSeek tokens above
        eos_id=-1,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # NFKC would rewrite the full-width bars in the specials
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, for chat streaming.

    A piece is emitted only once it ends on a complete character, so a multi-byte character split
    across tokens never comes out in halves. Each push decodes a short window of ids that starts one
    emitted piece back, so decoders that treat the start of a text specially still join correctly.
    The pushes plus `flush()` concatenate to `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._context_start = 0  # window start: the last emitted piece's ids, kept as context
        self._pending_start = 0  # ids from here on have not been emitted yet

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        return self._take(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. an incomplete character at the end of the stream)."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        context = self._decode(self._ids[self._context_start : self._pending_start])
        text = self._decode(self._ids[self._context_start :])
        # U+FFFD at the end means the last character's bytes are not all here yet.
        if (text.endswith("\ufffd") and not final) or len(text) <= len(context):
            return ""
        self._context_start, self._pending_start = self._pending_start, len(self._ids)
        return text[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self._skip_special) if ids else ""


class _HFBackend:
    def __init__(self, file: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tokenizer = HFTokenizer.from_file(str(file))

    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # Added (special) tokens are matched atomically by the library; BOS is added by Tokenizer.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special)


class _SentencePieceBackend:
    def __init__(self, file: Path) -> None:
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(file))
        self._vocab = {self._processor.id_to_piece(i): i for i in range(self._processor.get_piece_size())}
        # Control symbols are never parsed from text by sentencepiece, so specials are split out here.
        specials = sorted((t for t in SPECIAL_TOKENS.values() if t in self._vocab), key=len, reverse=True)
        self._special_by_id = {self._vocab[t]: t for t in specials}
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def vocab(self) -> dict[str, int]:
        return self._vocab

    def encode(self, text: str) -> list[int]:
        if self._special_pattern is None:
            return self._processor.encode(text)
        ids = []
        for i, part in enumerate(self._special_pattern.split(text)):
            if i % 2:  # odd parts are the captured special tokens
                ids.append(self._vocab[part])
            elif part:
                ids.extend(self._processor.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        # sentencepiece would print the specials' "▁" as spaces, so they are written out verbatim.
        text, run = [], []
        for i in ids:
            if i in self._special_by_id:
                text += [self._processor.decode(run), self._special_by_id[i]]
                run = []
            else:
                run.append(i)
        return "".join(text) + self._processor.decode(run)
