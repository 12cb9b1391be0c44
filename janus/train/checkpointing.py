"""Training checkpoints: DeepSpeed engine state (model, optimiser, schedule) plus each rank's data
position and RNG, under `DIR/step-NNNNNNNN/`. The file `DIR/latest` names the newest complete
checkpoint and is replaced atomically only after every rank has finished writing, so a run killed
mid-save resumes from the previous one."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LATEST = "latest"


def _tag(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int, rank: int):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.dir.mkdir(parents=True, exist_ok=True)

    def latest(self) -> str | None:
        f = self.dir / LATEST
        return f.read_text().strip() if f.is_file() else None

    def save(self, engine, step: int, data_state: dict[str, Any]) -> None:
        tag = _tag(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"step": step}, save_latest=False)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save({"data": data_state, "rng": rng}, self.dir / tag / f"data-rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            tmp = self.dir / f".{LATEST}.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.dir / LATEST)
            self._prune(tag)
        dist.barrier()

    def load(self, engine) -> tuple[int, dict[str, Any]]:
        """Restore the latest checkpoint; returns its step and this rank's data state."""
        tag = self.latest()
        if tag is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.dir}")
        _, client = engine.load_checkpoint(str(self.dir), tag=tag)
        state_file = self.dir / tag / f"data-rank{self.rank}.pt"
        if client is None or not state_file.is_file():
            raise FileNotFoundError(f"checkpoint {self.dir / tag} is incomplete for rank {self.rank}")
        saved = torch.load(state_file, weights_only=True)
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        return client["step"], saved["data"]

    def _prune(self, latest: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and unfinished newer ones."""
        tags = sorted(p.name for p in self.dir.glob("step-*") if p.is_dir())
        complete = [t for t in tags if t <= latest]
        for t in complete[: -self.keep] + [t for t in tags if t > latest]:
            shutil.rmtree(self.dir / t, ignore_errors=True)
