"""Training records on disk: JSONL manifests and tar shards (format in docs/data.md).

Bad data never stops a run: a record that cannot be used is skipped, counted per reason in a
`Counter`, and reported with a `DataWarning` that names the file and line or tar member.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from janus.processing import load_image, render_chat
from janus.processing.tokenizer import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN

KINDS = ("understanding", "text", "generation")  # a kind's index is its id in Sample.kind and Batch.kinds


class DataWarning(UserWarning):
    """A training record was skipped."""


@dataclass
class Record:
    kind: str
    data: dict  # the parsed JSON object
    images: list[Image.Image]  # RGB; understanding: in placeholder order, generation: the one target
    source: str  # "file:line" or "shard.tar:KEY", for messages


def skip(skipped: Counter, reason: str, source: str, detail: str = "") -> None:
    """Count a skipped record under `reason` and warn, naming it."""
    skipped[reason] += 1
    warnings.warn(f"skipped {source}: {reason}" + (f" ({detail})" if detail else ""), DataWarning, stacklevel=2)


def is_tar(path: str | Path) -> bool:
    return ".tar" in Path(path).suffixes


def read_records(path: str | Path, skipped: Counter) -> Iterator[Record]:
    """Every usable record of a manifest or tar shard, in file order."""
    if is_tar(path):
        for key, members in tar_samples(path, skipped):
            record = parse_tar_sample(path, key, members, skipped)
            if record is not None:
                yield record
    else:
        manifest = Manifest(path)
        for line in range(len(manifest)):
            record = manifest.record(line, skipped)
            if record is not None:
                yield record


class Manifest:
    """Random access to the lines of a JSONL manifest: the byte offset of every line is read once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        offsets, position = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                offsets.append(position)
                position += len(line)
        self.offsets = np.array(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, line: int, skipped: Counter) -> Record | None:
        """The record on 0-based line `line`; None for a blank line or (counted) bad data."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[line]))
            text = f.readline().decode("utf-8", errors="replace")
        if not text.strip():
            return None
        source = f"{self.path}:{line + 1}"
        return parse_record(text, source, lambda name: load_image(self.path.parent / name), skipped)


def tar_samples(path: str | Path, skipped: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar shard as samples: consecutive members sharing a key (the name up to its first dot)."""
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = PurePosixPath(member.name)
                member_key = str(name.parent / name.name.split(".", 1)[0])
                if member_key != key and members:
                    yield key, members
                    members = {}
                key = member_key
                members[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        # The sample being read may be incomplete: it is lost with the rest of the shard.
        skip(skipped, "unreadable shard", str(path), f"stopped reading at {key}: {error}")
        return
    if members:
        yield key, members


def parse_tar_sample(path: str | Path, key: str, members: dict[str, bytes], skipped: Counter) -> Record | None:
    source = f"{path}:{key}"
    if f"{key}.json" not in members:
        skip(skipped, "no json member", source, f"members {sorted(members)}")
        return None
    text = members[f"{key}.json"].decode("utf-8", errors="replace")

    def open_member(name: str) -> Image.Image:
        if name not in members:
            raise FileNotFoundError(f"no member {name} in this sample")
        return _decode_image(members[name], name)

    return parse_record(text, source, open_member, skipped)


def parse_record(text: str, source: str, open_image: Callable[[str], Image.Image], skipped: Counter) -> Record | None:
    """Validate one JSON record and load its images; None (counted and warned) when it is unusable."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        skip(skipped, "bad json", source, str(error))
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        skip(skipped, "unknown kind", source, f"kind {kind!r}; expected one of {KINDS}")
        return None
    problem = _check_fields(data)
    if problem:
        skip(skipped, "bad fields", source, problem)
        return None
    if data["kind"] == "text":
        return Record("text", data, [], source)
    names = data["images"] if data["kind"] == "understanding" else [data["image"]]
    images = []
    for name in names:
        try:
            images.append(open_image(name))
        except FileNotFoundError as error:
            skip(skipped, "missing image", source, str(error))
            return None
        except ValueError as error:
            skip(skipped, "unreadable image", source, str(error))
            return None
    return Record(data["kind"], data, images, source)


def _check_fields(data: dict) -> str:
    """What is wrong with a record's fields, or "" when nothing is."""
    kind = data["kind"]
    if kind == "text":
        return "" if _nonempty_str(data.get("text")) else "'text' must be a non-empty string"
    if kind == "generation":
        if not _nonempty_str(data.get("caption")):
            return "'caption' must be a non-empty string"
        if _has_image_tokens(data["caption"]):
            return "'caption' must not contain image tokens"
        return "" if _nonempty_str(data.get("image")) else "'image' must name an image file"
    images, conversation = data.get("images"), data.get("conversation")
    if not isinstance(images, list) or not all(_nonempty_str(name) for name in images):
        return "'images' must be a list of image file names"
    if not isinstance(conversation, list) or not conversation:
        return "'conversation' must be a non-empty list of messages"
    if not all(isinstance(m, dict) and _nonempty_str(m.get("content")) for m in conversation):
        return "every message must be a dict with non-empty 'content'"
    try:
        render_chat(conversation, ("User", "Assistant"))  # checks roles and their alternation
    except (ValueError, TypeError) as error:
        return str(error)
    placeholders = 0
    for message in conversation:
        if message["role"] == "assistant" and IMAGE_TOKEN in message["content"]:
            return f"an assistant message contains {IMAGE_TOKEN}"
        if BOI_TOKEN in message["content"] or EOI_TOKEN in message["content"]:
            return f"a message contains {BOI_TOKEN} or {EOI_TOKEN}"
        placeholders += message["content"].count(IMAGE_TOKEN)
    if placeholders != len(images):
        return f"{placeholders} {IMAGE_TOKEN} in the conversation but {len(images)} images"
    if not any(m["role"] == "assistant" for m in conversation):
        return "no assistant answer to learn from"
    return ""


def _nonempty_str(value) -> bool:
    return isinstance(value, str) and bool(value)


def _has_image_tokens(text: str) -> bool:
    return any(token in text for token in (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN))


def _decode_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now, so a truncated file fails here
            return load_image(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode image {name}: {error}") from error
