"""When and what the run checkpoints, and how it continues from one: the resume policy (`run.resume`), the
compatibility check against the checkpoint's config, conversion to DeepSpeed's universal format when the world size
changed, save cadence, retention (through `train.checkpoint.Checkpointer`) and rolling back after non-finite steps.

The state of a run is gathered here, in one dict: every stateful part is registered under a name and contributes
its `state_dict()`; a restore hands each part its own entry back. Checkpoint files themselves (layout, atomic
save, verification) are `train.checkpoint`'s business.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

from train import resume
from train import run_dir as layout
from train.checkpoint import Checkpointer
from train.config import Config
from train.errors import ConfigError
from train.metrics import Metrics


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CheckpointManager:
    def __init__(self, cfg: Config, rank: int, world_size: int, metrics: Metrics):
        self.cfg = cfg
        self.metrics = metrics
        self.rank, self.world_size = rank, world_size
        self.checkpointer = Checkpointer(cfg.run_dir / layout.CHECKPOINTS, rank, cfg.checkpoint.keep_last,
                                         cfg.checkpoint.keep_every)
        self.directory = self.checkpointer.directory
        self.parts: dict[str, Stateful] = {}
        self.last_path: Path | None = None  # the newest checkpoint this run saved or resumed from
        self.last_step: int | None = None  # and its step
        self.found = self._find_resume_point()
        self._load_tag = self.found[0] if self.found else None  # the tag DeepSpeed loads (maybe a conversion)
        self.config_changes: list[str] = []  # 'key: old -> new' of the allowed changes on resume

    def _find_resume_point(self) -> tuple[str, dict] | None:
        """(tag, checkpoint.json) to continue from, None to start fresh; run.resume decides whether either is an
        error."""
        found = self.checkpointer.find_latest()
        if found and self.cfg.run.resume == "never":
            raise ConfigError(f"run.resume: 'never' but {self.cfg.run_dir} already has checkpoint {found[0]}; "
                              "choose another run.name or set run.resume=auto")
        if not found and self.cfg.run.resume == "require":
            raise ConfigError(f"run.resume: 'require' but {self.directory} has no complete checkpoint")
        return found

    @property
    def resuming(self) -> bool:
        return self.found is not None

    def trained_precision(self) -> tuple[str, Path] | None:
        """(the precision the checkpoint to resume was trained in, that checkpoint), None when starting fresh."""
        if not self.found:
            return None
        return self.found[1]["identity"]["train"]["precision"], self.directory / self.found[0]

    def prepare_resume(self, identity: dict, ds_config: dict) -> None:
        """Check that this run may continue the checkpoint (before anything is loaded: a changed architecture fails
        here with the keys named, not deep inside a tensor-shape mismatch), and convert it to the universal format
        when it was written by another number of ranks (`ds_config` is told to load that). Collective."""
        if not self.found:
            return
        tag, meta = self.found
        self.config_changes = resume.check_compatible(meta["identity"], identity, self.directory / tag)
        if meta["world_size"] != self.world_size:
            self._load_tag = resume.convert_to_universal(self.directory, tag, self.rank)
            ds_config["checkpoint"] = {"load_universal": True}

    def register(self, name: str, part: Stateful) -> None:
        """Save and restore `part` under `name` in every checkpoint."""
        self.parts[name] = part

    def restore(self, engine) -> Path:
        """Load the checkpoint found at start into the engine and every registered part. Collective."""
        tag = self.found[0]
        self._restore(engine, tag, self._load_tag)
        return self.last_path

    def _restore(self, engine, tag: str, load_tag: str) -> None:
        client_state = _upgrade(self.checkpointer.load(engine, load_tag, rng_tag=tag))
        for name, part in self.parts.items():
            part.load_state_dict(client_state[name])
        self.last_path, self.last_step = self.directory / tag, client_state["trainer"]["step"]

    def roll_back(self, engine) -> Path | None:
        """Restore the newest complete checkpoint (after non-finite steps); None when there is none. Collective."""
        found = self.checkpointer.find_latest()
        if found is None:
            return None
        self._restore(engine, found[0], found[0])
        return self.last_path

    def save_due(self, step: int) -> bool:
        return bool(self.cfg.checkpoint.every) and step % self.cfg.checkpoint.every == 0

    def save(self, engine, step: int, meta: dict) -> Path:
        """A checkpoint of `step` holding every registered part, and `meta` in its checkpoint.json. Collective."""
        client_state = {name: part.state_dict() for name, part in self.parts.items()}
        client_state["world_size"] = self.world_size
        # ds_to_universal refuses checkpoints without it (resume at another world size)
        client_state[UNIVERSAL_CHECKPOINT_INFO] = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        start = time.perf_counter()
        path = self.checkpointer.save(engine, step, client_state, meta={"world_size": self.world_size, **meta})
        self.last_path, self.last_step = path, step
        seconds = time.perf_counter() - start
        self.metrics.log(step, {"ckpt/save_seconds": seconds})
        self.metrics.print(f"checkpoint {path} ({seconds:.1f}s)")
        return path

    def checkpoint_now(self, engine, step: int, meta: dict) -> Path:
        """A checkpoint of `step`: the one already written (or resumed from) for it, or a new one."""
        return self.last_path if self.last_step == step else self.save(engine, step, meta)

    def mark_best(self, step: int) -> None:
        self.checkpointer.mark_best(step)

    def best_tag(self) -> str | None:
        return self.checkpointer.best_tag()

    def load_weights(self, engine, tag: str) -> None:
        self.checkpointer.load_weights(engine, tag)


def _upgrade(client_state: dict) -> dict:
    """Client state of checkpoints written before the evaluation and non-finite counters had their own entries
    (everything sat under "trainer")."""
    if "evaluation" in client_state:
        return client_state
    trainer = client_state["trainer"]
    return {**client_state, "trainer": {"step": trainer["step"], "tokens_seen": trainer["tokens_seen"]},
            "evaluation": {"best": trainer.get("best"), "test_before": trainer.get("test_before")},
            "nonfinite": {"nonfinite_steps": trainer["nonfinite_steps"], "rollbacks": trainer["rollbacks"]}}
