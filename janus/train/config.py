"""Run configuration: one YAML file names the stage, the model to start from, the data mixture, the
optimiser and schedule, the DeepSpeed config and where checkpoints go. Unset values take the stage's
defaults from DESIGN.md §6; `--set key.sub=value` overrides any field from the command line.
Relative paths are relative to the working directory. Strings may use `{root}` (the config's `root`),
`{stage}` and `{prev}` (the stage before), and a `stages:` mapping holds per-stage values (e.g.
`stages: {2: {train: {steps: 5000}}}`) merged over the rest, so one file can describe a whole
three-stage run."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .stages import STAGES

KINDS = ("understanding", "text", "generation")


@dataclass
class DataConfig:
    sources: dict[str, list[str]] = field(default_factory=dict)  # kind -> manifests (.jsonl) or shards (.tar)
    ratios: dict[str, float] | None = None  # kind -> weight; default: the stage's und : text : gen
    seq_len: int = 4096
    uncond_prob: float = 0.1  # generation prompts replaced by pads, for classifier-free guidance
    # Directories from `janus tokenize-images`, looked up in order (a single path is allowed); an image
    # that none holds is encoded on the fly.
    code_cache: list[str] = field(default_factory=list)
    prefetch_rows: int = 16  # rows built ahead in a background thread; 0 builds them between steps


@dataclass
class OptimConfig:
    lr: float | None = None  # default: the stage's
    warmup_steps: int | None = None  # default: the stage's; then constant
    decay_steps: int = 0  # linear decay over the last steps (warm-up, stable, decay); 0: constant to the end
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000  # optimiser steps
    micro_batch_size: int = 1  # packed rows per process per micro-step
    grad_accum: int = 1
    seed: int = 0
    activation_checkpointing: bool = False
    cpu_autocast: bool = False  # on CPU, bf16 autocast of the forward (fp32 weights); GPUs use DeepSpeed's bf16
    peak_tflops: float | None = None  # per process, for the MFU estimate; None: known GPUs only


@dataclass
class CheckpointConfig:
    dir: str = "runs/run"
    every: int = 500  # optimiser steps between checkpoints
    keep: int = 3  # most recent checkpoints kept


@dataclass
class RunConfig:
    stage: int
    init_from: str  # a checkpoint directory (any layout, with tokenizer): stage N starts from stage N-1's export
    root: str = "."
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: dict[str, Any] | str = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    log_every: int = 10
    # Modules that receive gradients (names of JanusModel's children); default: the stage's. E.g.
    # [vision, und_adaptor] trains the understanding path alone and leaves generation bit-identical.
    trains: list[str] | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        defaults = STAGES[self.stage]
        if self.data.ratios is None:
            self.data.ratios = dict(zip(KINDS, defaults.ratios))
        unknown = (set(self.data.ratios) | set(self.data.sources)) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown data kinds {sorted(unknown)}; use {KINDS}")
        # Paths are normalised lexically, so "{root}/../data" works before {root} exists.
        self.init_from = os.path.normpath(self.init_from)
        self.checkpoint.dir = os.path.normpath(self.checkpoint.dir)
        caches = self.data.code_cache
        caches = [caches] if isinstance(caches, str) else caches or []  # one path, or null: none
        self.data.code_cache = [os.path.normpath(d) for d in caches]
        self.data.sources = {kind: [os.path.normpath(f) for f in files] for kind, files in self.data.sources.items()}
        if self.data.prefetch_rows < 0:
            raise ValueError(f"data.prefetch_rows must be 0 or more, got {self.data.prefetch_rows}")
        if self.trains is not None:
            if not self.trains or not all(isinstance(name, str) for name in self.trains):
                raise ValueError(f"trains must be a non-empty list of module names, got {self.trains!r}")
            self.trains = list(self.trains)
        if self.optim.lr is None:
            self.optim.lr = defaults.lr
        if self.optim.warmup_steps is None:
            self.optim.warmup_steps = defaults.warmup_steps
        self.optim.betas = tuple(self.optim.betas)

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config dict; a string names a JSON/YAML file."""
        ds = self.deepspeed
        if isinstance(ds, str):
            with open(ds) as f:
                ds = yaml.safe_load(f)
        return dict(ds)


def set_field(tree: dict, dotted: str, value: str) -> None:
    """tree[a][b] = value for 'a.b'; the value is parsed as YAML when it is valid YAML."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:  # e.g. "{root}/x": a string, not a YAML mapping
        parsed = value
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)  # YAML 1.1 reads "3e-4" (no dot) as a string
        except ValueError:
            pass
    tree[leaf] = parsed


def _fill(node: Any, names: dict[str, Any]) -> Any:
    if isinstance(node, str):
        return node.format(**names)
    if isinstance(node, dict):
        return {k: _fill(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, names) for v in node]
    return node


def _merge(base: dict, update: dict) -> dict:
    """`base` with `update` merged in recursively (update wins)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


FlatConfig = TypeVar("FlatConfig")


def load_flat_config(cls: type[FlatConfig], path: str | Path, overrides: list[str] = ()) -> FlatConfig:
    """A one-level dataclass config (the stage-0 runs) from a YAML file with `key=value` overrides;
    unknown or missing fields are named in a ValueError."""
    try:
        return cls(**read_config_tree(path, overrides))
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


def read_config_tree(path: str | Path, overrides: list[str] = (), stage: int | None = None) -> dict[str, Any]:
    """A YAML config file as a dict: its `stages[stage]` section merged in (for the file's own `stage`,
    else the given one, if any), then `key.sub=value` overrides applied (values parsed as YAML)."""
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    stage = tree.get("stage", stage)  # a stage named in the file wins
    if stage is not None:
        per_stage = tree.pop("stages", None) or {}
        if not isinstance(per_stage, dict) or not all(isinstance(v, dict) for v in per_stage.values()):
            raise ValueError(f"{path}: `stages` must map stage numbers to config sections")
        tree = _merge(tree, per_stage.get(stage, {}))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        set_field(tree, *item.split("=", 1))
    return tree


def load_run_config(path: str | Path, overrides: list[str] = (), stage: int | None = None) -> RunConfig:
    """Read a run config with overrides and fill in {root}/{stage}/{prev}. `stage` (from the entry
    point) is used when the file names none."""
    tree = read_config_tree(path, overrides, stage)
    tree.setdefault("stage", stage)
    if tree["stage"] is None:
        raise ValueError(f"{path} names no stage")
    try:
        tree = _fill(tree, {"root": tree.get("root", "."), "stage": tree["stage"], "prev": tree["stage"] - 1})
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: bad placeholder {e}; use {{root}}, {{stage}} or {{prev}}") from None
    sections = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "checkpoint": CheckpointConfig}
    try:
        kwargs = {k: (sections[k](**v) if k in sections else v) for k, v in tree.items()}
        return RunConfig(**kwargs)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
