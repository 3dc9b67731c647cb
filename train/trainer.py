"""The one training loop: build everything from a Config, train, evaluate, checkpoint, resume.

Each stateful part owns its state (`GlobalBatchSampler`, the DeepSpeed engine, per-rank RNG, the counters here);
`Checkpointer` gathers them. Losses stay on the device and are read back only at log and eval points; the one
per-step host sync is a 2-integer all-reduce (preemption signal, non-finite loss) that keeps the ranks in step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import deepspeed
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
import torch
import torch.distributed as dist
import yaml

from data_prep.shards import ShardSet
from train import ds_config as ds_config_lib
from train import faults, preemption, resume
from train.checkpoint import Checkpointer, write_atomic
from train.config import Config
from train.data import GlobalBatchSampler, TokenWindows, eval_batches
from train.distributed import init_distributed
from train.errors import ConfigError, RunError
from train.metrics import Metrics
from train.model import build_causal_lm, build_hf_config, count_parameters, param_groups
from train.rng import seed_everything
from train.schedule import lr_at


def _set_cpu_threads() -> None:
    """On CPU, ranks on one host share its cores; without a limit each rank starts one thread per core and they
    thrash. An explicit OMP_NUM_THREADS (set by the user or the launcher) wins."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        init_distributed(cfg.train.collective_timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        _set_cpu_threads()
        self.run_dir = cfg.run_dir
        self.metrics = None

        self.train_windows = TokenWindows(ShardSet(cfg.data.path, cfg.data.train_split), cfg.data.seq_len)
        self.val_windows = (TokenWindows(ShardSet(cfg.data.path, cfg.data.val_split), cfg.data.seq_len)
                            if cfg.data.val_split else None)
        manifest = self.train_windows.shards.manifest
        self.sampler = GlobalBatchSampler(len(self.train_windows), cfg.train.micro_batch_size,
                                          cfg.train.grad_accum_steps, self.world_size, self.rank, cfg.run.seed)
        self.tokens_per_step = self.sampler.global_batch * cfg.data.seq_len
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]

        ds_config = ds_config_lib.build(cfg, self.world_size)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.rank, cfg.train.keep_last,
                                         cfg.train.keep_every)
        found = self.checkpointer.find_latest()
        if found and cfg.run.resume == "never":
            raise ConfigError(f"run.resume: 'never' but {self.run_dir} already has checkpoint {found[0]}; "
                              "choose another run.name or set run.resume=auto")
        load_tag = None
        self.config_changes = []
        if found:
            tag, meta = found
            # Checked before anything is loaded or converted: a changed architecture fails here with the keys
            # named, not deep inside a tensor-shape mismatch.
            self.config_changes = resume.check_compatible(meta["identity"], self._identity(),
                                                          self.checkpointer.directory / tag)
            load_tag = tag
            if meta["world_size"] != self.world_size:
                load_tag = resume.convert_to_universal(self.checkpointer.directory, tag, self.rank)
                ds_config["checkpoint"] = {"load_universal": True}

        hf_config = build_hf_config(cfg.model, manifest["tokenizer"], cfg.data.seq_len)
        seed_everything(cfg.run.seed)  # same initial weights on every rank
        if ds_config_lib.zero_stage(ds_config) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Must stay referenced while the model is built: transformers checks it to partition at init.
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = build_causal_lm(cfg.model, hf_config)
        self.trainable_params, self.total_params = count_parameters(model)
        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        seed_everything(cfg.run.seed + self.rank)  # dropout masks differ between ranks

        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0  # steps whose loss or gradients were not finite
        self.rollbacks = 0
        self._nonfinite_batches: list[tuple[int, int]] = []  # the current run of non-finite steps
        self.last_checkpoint: Path | None = None  # and the step it holds is self.step right after save/resume
        self.last_checkpoint_step: int | None = None
        self.resumed_from = None
        if found:
            self._resume(tag, load_tag)
            self.resumed_from = str(self.last_checkpoint)

        self.preemption = preemption.PreemptionFlag()
        self.preempted = False
        self._step_flags = torch.zeros(2, dtype=torch.int32, device=self.engine.device)
        self.metrics = Metrics(self.run_dir, enabled=self.rank == 0)
        if self.rank == 0:
            resolved = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            write_atomic(self.run_dir / "config.yaml", resolved.encode())
            self.metrics.text("config", f"```\n{resolved}\n```")

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_steps": self.nonfinite_steps,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.nonfinite_steps, self.rollbacks = state["nonfinite_steps"], state["rollbacks"]

    def _identity(self) -> dict:
        """What a checkpoint must agree with for this run to continue it (see train.resume)."""
        return {**self.cfg.to_dict(), "tokenizer_fingerprint": self.tokenizer_fingerprint}

    def _resume(self, tag: str, load_tag: str) -> None:
        client_state = self.checkpointer.load(self.engine, load_tag, rng_tag=tag)
        self.load_state_dict(client_state["trainer"])
        self.sampler.load_state_dict(client_state["sampler"])
        self.last_checkpoint_step = self.step
        self.last_checkpoint = self.checkpointer.directory / tag

    def save(self) -> Path:
        client_state = {"trainer": self.state_dict(), "sampler": self.sampler.state_dict(),
                        "world_size": self.world_size,
                        # ds_to_universal refuses checkpoints without it (resume at another world size)
                        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        start = time.perf_counter()
        path = self.checkpointer.save(self.engine, self.step, client_state,
                                      meta={"world_size": self.world_size, "config_fingerprint": self.cfg.fingerprint(),
                                            "identity": self._identity()})
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        self.metrics.print(f"checkpoint {path} ({time.perf_counter() - start:.1f}s)")
        return path

    def checkpoint_now(self) -> Path:
        """A checkpoint of the current step: the one already written for it, or a new one."""
        return self.last_checkpoint if self.last_checkpoint_step == self.step else self.save()

    # ------------------------------------------------------------------------------------------------ loop
    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss as a device tensor."""
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.engine.device)
        for indices in self.sampler.next_step():
            input_ids = self.train_windows.batch(indices).to(self.engine.device, non_blocking=True)
            loss = faults.poison(self.engine(input_ids=input_ids, labels=input_ids).loss, self.sampler, self.rank)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed only updates at the accumulation boundary
            loss_sum += loss.detach().float()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return loss_sum / self.cfg.train.grad_accum_steps

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_windows is None:
            return None
        self.engine.eval()
        totals = torch.zeros(2, device=self.engine.device)  # (sum of batch losses, batches)
        for indices in eval_batches(len(self.val_windows), self.cfg.train.micro_batch_size, self.world_size,
                                    self.rank, self.cfg.train.eval_batches):
            input_ids = self.val_windows.batch(indices).to(self.engine.device)
            totals[0] += self.engine(input_ids=input_ids, labels=input_ids).loss.float()
            totals[1] += 1
        dist.all_reduce(totals)
        self.engine.train()
        if totals[1] == 0:
            raise ConfigError(f"data.val_split '{self.cfg.data.val_split}' has fewer than "
                              f"micro_batch_size x world size = {self.cfg.train.micro_batch_size * self.world_size} "
                              f"windows of {self.cfg.data.seq_len} tokens; use a larger split or data.val_split=''")
        return (totals[0] / totals[1]).item()

    def _agree(self, step_loss: torch.Tensor) -> tuple[bool, bool]:
        """(was any rank signalled, was any rank's loss non-finite): the loop's one per-step host sync, a tiny
        all-reduce so that every rank stops, skips or rolls back at the same step."""
        self._step_flags[0] = 1 if self.preemption.received else 0
        self._step_flags[1] = (~torch.isfinite(step_loss)).int()
        dist.all_reduce(self._step_flags, op=dist.ReduceOp.MAX)
        signalled, nonfinite = self._step_flags.tolist()
        # DeepSpeed skips an update whose gradients overflow (bf16/fp16, every ZeRO stage): non-finite too.
        return bool(signalled), bool(nonfinite) or not self.engine.was_step_applied()

    def _on_nonfinite(self) -> bool:
        """The update was skipped (DeepSpeed found non-finite gradients) or, where DeepSpeed applies it anyway
        (fp32 on ZeRO-0), it may have corrupted the weights: roll back then, or after too many skips in a row.
        Returns whether it rolled back."""
        self.nonfinite_steps += 1
        self._nonfinite_batches.append(self.sampler.step_start)
        self.metrics.log(self.step, {"train/nonfinite_steps": self.nonfinite_steps})
        applied = self.engine.was_step_applied()
        in_a_row = len(self._nonfinite_batches)
        if not applied and in_a_row < self.cfg.train.nonfinite_max_in_a_row:
            self.metrics.print(f"step {self.step}: non-finite loss or gradients, update skipped ({in_a_row} in a row)")
            return False
        reason = ("non-finite loss or gradients and this ZeRO stage applied the update" if applied else
                  f"{in_a_row} steps in a row with non-finite loss or gradients")
        if self.rollbacks >= self.cfg.train.nonfinite_max_rollbacks:
            raise RunError(f"step {self.step}: {reason}; stopping after {self.rollbacks} rollbacks "
                           f"(train.nonfinite_max_rollbacks). {self.nonfinite_steps} non-finite steps so far; "
                           "lower optim.lr, raise optim.warmup_steps or check the data")
        found = self.checkpointer.find_latest()
        if found is None:
            raise RunError(f"step {self.step}: {reason}, and there is no checkpoint to roll back to; lower optim.lr "
                           "or save checkpoints earlier (train.save_every)")
        counters = self.nonfinite_steps, self.rollbacks + 1
        skipped = self.sampler.skipped | set(self._nonfinite_batches)
        failed_step = self.step
        self._resume(found[0], found[0])
        self.nonfinite_steps, self.rollbacks = counters
        self.sampler.skip(skipped)
        self._nonfinite_batches.clear()
        self.metrics.print(f"step {failed_step}: {reason}; rolled back to {self.last_checkpoint}, skipping "
                           f"{len(skipped)} bad batch(es) (rollback {self.rollbacks} of "
                           f"{self.cfg.train.nonfinite_max_rollbacks})")
        return True

    def _log_train(self, train_loss: float, steps: int, elapsed: float) -> None:
        tokens_per_s = steps * self.tokens_per_step / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr = lr_at(self.step - 1, self.cfg.optim, self.cfg.train.max_steps)
        self.metrics.log(self.step, {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                     "train/tokens_per_s": tokens_per_s})
        self.metrics.print(f"step {self.step}/{self.cfg.train.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                           f"grad_norm {grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s")

    def _log_eval(self) -> float | None:
        val_loss = self.evaluate()
        if val_loss is not None:
            self.metrics.log(self.step, {"val/loss": val_loss})
            self.metrics.print(f"step {self.step} | val_loss {val_loss:.4f}")
        return val_loss

    def fit(self) -> dict:
        cfg, train = self.cfg, self.cfg.train
        self.metrics.print(
            f"run {self.run_dir} | {self.world_size} ranks | {self.total_params:,} parameters "
            f"({self.trainable_params:,} trainable) | global batch {self.sampler.global_batch} x "
            f"{cfg.data.seq_len} tokens | {len(self.train_windows):,} training windows"
            + (f" | resumed from {self.resumed_from}" if self.resumed_from else ""))
        if self.config_changes:
            self.metrics.print(f"resumed with changed settings: {'; '.join(self.config_changes)}")
        fit_start = time.perf_counter()
        start_step = self.step
        interval_loss = torch.zeros((), device=self.engine.device)
        interval_steps, interval_start = 0, time.perf_counter()
        train_loss = val_loss = None
        while self.step < train.max_steps:
            step_loss = self.train_step()
            signalled, nonfinite = self._agree(step_loss)
            if nonfinite:
                if self._on_nonfinite():  # rolled back: the interval's losses belong to undone steps
                    interval_loss.zero_()
                    interval_steps, interval_start = 0, time.perf_counter()
            else:
                self._nonfinite_batches.clear()
                interval_loss += step_loss
                interval_steps += 1
            if interval_steps and (self.step % train.log_every == 0 or self.step == train.max_steps):
                # Losses stay on the device between log points: one all-reduce and one read per interval.
                dist.all_reduce(interval_loss)
                train_loss = interval_loss.item() / (self.world_size * interval_steps)
                self._log_train(train_loss, interval_steps, time.perf_counter() - interval_start)
                interval_loss.zero_()
                interval_steps, interval_start = 0, time.perf_counter()
            if self.step < train.max_steps and not nonfinite:
                if train.eval_every and self.step % train.eval_every == 0:
                    val_loss = self._log_eval()
                if train.save_every and self.step % train.save_every == 0:
                    self.save()
            faults.inject("after_step", self.step, self.rank)
            if signalled and self.step < train.max_steps:
                self.preempted = True
                break
        wall = time.perf_counter() - fit_start
        if self.preempted:
            checkpoint = self.checkpoint_now()
            signalled = self.preemption.received_at
            self.metrics.print(f"preempted ({self.preemption.received or 'signal on another rank'}) at step "
                               f"{self.step}: checkpoint {checkpoint} on disk "
                               + (f"{time.time() - signalled:.1f}s after the signal" if signalled else ""))
        else:
            val_loss = self._log_eval()
            checkpoint = self.checkpoint_now()
        steps_run = self.step - start_step
        summary = {
            "run_dir": str(self.run_dir), "steps": self.step, "steps_this_session": steps_run,
            "tokens_seen": self.tokens_seen, "wall_seconds": round(wall, 3),
            "mean_tokens_per_s": steps_run * self.tokens_per_step / wall if steps_run else None,
            "final_train_loss": train_loss, "final_val_loss": val_loss, "checkpoint": str(checkpoint),
            "tensorboard_dir": str(self.metrics.tb_dir), "resumed_from": self.resumed_from,
            "world_size": self.world_size, "parameters": self.total_params,
            "config_fingerprint": cfg.fingerprint(), "preempted": self.preempted,
            "nonfinite_steps": self.nonfinite_steps, "rollbacks": self.rollbacks,
        }
        if self.rank == 0:
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        if self.preempted:
            return summary
        self.metrics.print(f"done: {self.step} steps, val_loss {val_loss}, checkpoint {checkpoint}\n"
                           f"TensorBoard: tensorboard --logdir {self.metrics.tb_dir}")
        return summary

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
