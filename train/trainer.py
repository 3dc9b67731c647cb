"""The one training loop for every task and fine-tuning method.

`Trainer` builds the run's parts from a Config and runs the loop: one training step, then a handful of named
events (log, validate, checkpoint, non-finite step, preemption). Each part owns its concern and its state:
- `train.data.RunData`: the splits and the global batch order (`GlobalBatchSampler`);
- `train.engine`: the model in its DeepSpeed engine, with its optimizer;
- `train.checkpointing.CheckpointManager`: resume policy, save cadence, rollback; gathers every part's
  `state_dict` into one checkpoint;
- `train.evaluation.Evaluator`: validation, best checkpoint, early stopping, test before/after, results.json;
- `train.reporting.Reporter`: log intervals, tokens/s, MFU, memory, summary.json, HParams;
- `train.nonfinite.NonFiniteGuard`: skip or roll back after a non-finite loss or gradient.
What differs between tasks is only the items a batch is made of (`train.data`) and what is computed from the logits
(`train.tasks`). Losses stay on the device and are read back only at log and eval points; the one per-step host sync
is a 3-integer all-reduce (preemption signal, non-finite loss, tokens in the step) that keeps the ranks in step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from deepspeed.accelerator import get_accelerator

from data_prep import faults
from data_prep.files import write_atomic
from train import ds_config as ds_config_lib
from train import preemption, tasks
from train import precision as precision_lib
from train import run_dir as layout
from train.checkpointing import CheckpointManager
from train.config import Config
from train.data import open_run_data
from train.distributed import start_training_process
from train.engine import build_engine, forward
from train.evaluation import Evaluator, describe
from train.metrics import Metrics
from train.nonfinite import Action, NonFiniteGuard
from train.reporting import Reporter, summary_table
from train.rng import seed_everything
from train.schedule import lr_at


class Trainer:
    def __init__(self, cfg: Config):
        self.rank, self.world_size = start_training_process(cfg.train.collective_timeout_s)
        self.metrics = Metrics(cfg.run_dir, enabled=self.rank == 0)
        self.data = open_run_data(cfg, self.rank, self.world_size)
        self.sampler, self.max_steps = self.data.sampler, self.data.max_steps
        self.checkpoints = CheckpointManager(cfg, self.rank, self.world_size, self.metrics)
        # From here on cfg.train.precision is the concrete precision (auto resolved), in config.yaml and the
        # checkpoint's identity too, so a resume compares what was actually trained.
        device = torch.device(get_accelerator().current_device_name())
        self.precision = precision_lib.agree(cfg.train.precision, self.checkpoints.trained_precision(), device)
        self.cfg = cfg = precision_lib.with_precision(cfg, self.precision.precision)
        ds_config = ds_config_lib.build(cfg, self.world_size)
        self.checkpoints.prepare_resume(self._identity(), ds_config)
        self.model = build_engine(cfg, self.data.manifest, ds_config)
        self.engine = self.model.engine
        self.reporter = Reporter(cfg, self.metrics, self.engine, self.world_size, self.model.flops, self.precision,
                                 self.sampler.global_batch, self.data.steps_per_epoch, self.max_steps)
        seed_everything(cfg.run.seed + self.rank)  # dropout masks differ between ranks
        self.evaluator = Evaluator(cfg, self.engine, self.metrics, self.data.val, self.data.test,
                                   self.data.num_labels, self.rank, self.world_size)
        self.guard = NonFiniteGuard(cfg.train)
        self.step = 0
        self.tokens_seen = 0
        for name, part in (("trainer", self), ("sampler", self.sampler), ("evaluation", self.evaluator),
                           ("nonfinite", self.guard)):
            self.checkpoints.register(name, part)
        self.resumed_from = self.checkpoints.restore(self.engine) if self.checkpoints.resuming else None
        self.preemption = preemption.PreemptionFlag()
        self.preempted = False
        self._step_flags = torch.zeros(3, dtype=torch.int64, device=self.engine.device)
        if self.rank == 0:
            resolved = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            write_atomic(cfg.run_dir / layout.CONFIG, resolved)
            # train.export / train.predict rebuild the model from these two files, without the shards.
            write_atomic(cfg.run_dir / layout.DATA_MANIFEST, json.dumps(self.data.manifest, indent=1))
            self.metrics.text("config", f"```\n{resolved}\n```")

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]

    def _identity(self) -> dict:
        """What a checkpoint must agree with for this run to continue it (see train.resume)."""
        return {**self.cfg.to_dict(), "tokenizer_fingerprint": self.data.manifest["tokenizer"]["fingerprint"]}

    def checkpoint_now(self) -> Path:
        """A checkpoint of the current step: the one already written for it, or a new one."""
        return self.checkpoints.checkpoint_now(self.engine, self.step, {
            "config_fingerprint": self.cfg.fingerprint(), "identity": self._identity(),
            "precision": self.precision.as_dict()})

    # ------------------------------------------------------------------------------------------------ loop
    def train_step(self) -> tuple[torch.Tensor, int]:
        """One optimizer step over grad_accum_steps micro-batches: (mean loss as a device tensor, this rank's
        tokens)."""
        lr = lr_at(self.step, self.cfg.optim, self.max_steps)
        for group in self.model.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.engine.device)
        tokens = 0
        for indices in self.sampler.next_step():
            start = time.perf_counter()
            batch, num_tokens = self.data.train.model_batch(indices)
            self.reporter.data_wait_s += time.perf_counter() - start
            labels = batch.pop("labels").to(self.engine.device, non_blocking=True)
            loss = tasks.loss(self.cfg.task.kind, forward(self.engine, batch), labels, self.cfg.task.label_smoothing)
            if faults.ACTIVE:
                loss = faults.poison(loss, self.sampler.step_start, self.rank)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed only updates at the accumulation boundary
            loss_sum += loss.detach().float()
            tokens += num_tokens
        self.step += 1
        return loss_sum / self.cfg.train.grad_accum_steps, tokens

    def _agree(self, step_loss: torch.Tensor, tokens: int) -> tuple[bool, bool, int]:
        """(was any rank signalled, was any rank's loss non-finite, tokens of the step over all ranks): the loop's
        one per-step host sync, a tiny all-reduce so that every rank stops, skips or rolls back at the same step."""
        self._step_flags[0] = 1 if self.preemption.received else 0
        self._step_flags[1] = (~torch.isfinite(step_loss)).long()
        self._step_flags[2] = tokens
        dist.all_reduce(self._step_flags)
        signalled, nonfinite, step_tokens = self._step_flags.tolist()
        # DeepSpeed skips an update whose gradients overflow (bf16/fp16, every ZeRO stage): non-finite too. Under
        # fp16 an overflow with a finite loss is the dynamic loss scaler at work (it lowers the scale and skips the
        # step, often a few times at the start), not a diverging run.
        overflow_is_nonfinite = self.cfg.train.precision != "fp16"
        skipped = not self.engine.was_step_applied()
        return bool(signalled), bool(nonfinite) or (skipped and overflow_is_nonfinite), step_tokens

    def _on_nonfinite(self) -> None:
        """Skip the step's update, or roll back to the last checkpoint and never train on the bad batches again."""
        action, reason = self.guard.nonfinite(self.step, self.sampler.step_start, self.engine.was_step_applied())
        self.metrics.log(self.step, {"train/nonfinite_steps": self.guard.nonfinite_steps})
        if action is Action.SKIP:
            self.metrics.print(f"step {self.step}: {reason}")
            return
        counters, failed_step = self.guard.state_dict(), self.step
        skipped = self.sampler.skipped | set(self.guard.bad_batches)
        if self.checkpoints.roll_back(self.engine) is None:
            raise self.guard.no_checkpoint(self.step, reason)
        self.guard.rolled_back(counters)
        self.sampler.skip(skipped)
        self.reporter.reset_interval()  # its losses belong to undone steps
        self.metrics.print(f"step {failed_step}: {reason}; rolled back to {self.checkpoints.last_path}, skipping "
                           f"{len(skipped)} bad batch(es) (rollback {self.guard.rollbacks} of "
                           f"{self.cfg.train.nonfinite_max_rollbacks})")

    def _validate(self) -> None:
        if self.evaluator.validate(self.step):
            self.checkpoint_now()
            self.checkpoints.mark_best(self.step)
            best = self.evaluator.best
            self.metrics.print(f"step {self.step}: new best {best.metric} {best.best_value:.4f}")

    def fit(self) -> dict:
        self._print_start()
        self.evaluator.test_starting_model(self.step)
        fit_start = time.perf_counter()
        start_step, start_tokens = self.step, self.tokens_seen
        self.reporter.reset_interval()
        self.reporter.start_progress(self.step)
        while self.step < self.max_steps and not self.evaluator.stopped_early:
            step_loss, tokens = self.train_step()
            signalled, nonfinite, step_tokens = self._agree(step_loss, tokens)
            if nonfinite:
                self._on_nonfinite()
            else:
                self.guard.finite()
                self.tokens_seen += step_tokens
                self.reporter.add_step(step_loss, step_tokens)
            if self.reporter.log_due(self.step):
                self.reporter.log_interval(self.step, lr_at(self.step - 1, self.cfg.optim, self.max_steps),
                                           self.tokens_seen)
            if self.step < self.max_steps and not nonfinite:
                if self.evaluator.due(self.step, self.sampler.at_epoch_end()):
                    self._validate()
                if self.checkpoints.save_due(self.step):
                    self.checkpoint_now()
            self.metrics.progress(self.step)
            if faults.ACTIVE:
                faults.at_step("after_step", self.step, self.rank)
            if signalled and self.step < self.max_steps and not self.evaluator.stopped_early:
                self.preempted = True
                break
        wall = time.perf_counter() - fit_start
        self.reporter.end_progress()
        if self.preempted:
            checkpoint = self.checkpoint_now()
            signalled = self.preemption.received_at
            self.metrics.print(f"preempted ({self.preemption.received or 'signal on another rank'}) at step "
                               f"{self.step}: checkpoint {checkpoint} on disk "
                               + (f"{time.time() - signalled:.1f}s after the signal" if signalled else ""))
        else:
            if not self.evaluator.validated_at(self.step):
                self._validate()
            checkpoint = self.checkpoint_now()
            if self.evaluator.stopped_early:
                best = self.evaluator.best
                self.metrics.print(f"early stop at step {self.step}: {best.metric} did not improve for "
                                   f"{best.patience} evaluations (best {best.best_value:.4f} at step "
                                   f"{best.best_step})")
        summary = self.reporter.write_summary(self._summary(checkpoint, wall, start_step),
                                              self.tokens_seen - start_tokens)
        if self.preempted:
            self.metrics.print(summary_table(summary))
            return summary
        results = self.evaluator.final_results(self.step, self.checkpoints)
        self.reporter.hparams(summary, results, self.step)
        self.metrics.print(f"done: {self.step} steps, {describe(summary['final_val']) or 'no validation split'}, "
                           f"checkpoint {checkpoint}"
                           + (f", best {results['best']['checkpoint']}" if results["best"] else "")
                           + f"\nTensorBoard: tensorboard --logdir {self.metrics.tb_dir}")
        self.metrics.print(summary_table(summary))
        return summary

    def _print_start(self) -> None:
        cfg, data = self.cfg, self.data
        self.metrics.print(
            f"run {cfg.run_dir} | {self.world_size} ranks | {self.model.total_params:,} parameters "
            f"({self.model.trainable_params:,} trainable) | {cfg.task.kind}, {cfg.model.init}, {cfg.finetune.method} "
            f"| global batch {self.sampler.global_batch} | {len(data.train):,} training items, "
            f"{data.steps_per_epoch:,} steps per epoch, {self.max_steps:,} steps"
            + (f" | resumed from {self.resumed_from}" if self.resumed_from else "")
            + f"\nprecision {self.precision.precision} ({self.precision.reason})")
        if self.checkpoints.config_changes:
            self.metrics.print(f"resumed with changed settings: {'; '.join(self.checkpoints.config_changes)}")
        if any(data.items_cut.values()):
            self.metrics.print(f"data.seq_len={cfg.data.seq_len} cuts items longer than that (each keeps its first "
                               f"{cfg.data.seq_len - 1} tokens and its last): "
                               + ", ".join(f"{n:,} {split}" for split, n in data.items_cut.items()))
        for part in data.blend or []:
            self.metrics.print(f"blend: {part['path']} weight {part['weight']:.4f}, realised {part['realised']:.4f} "
                               f"of each epoch's {len(data.train):,} samples")

    def _summary(self, checkpoint: Path, wall: float, start_step: int) -> dict:
        """What the session did; the reporter adds throughput, MFU and memory."""
        val = self.evaluator.last[1] if self.evaluator.last else {}
        best = self.evaluator.best
        best_tag = self.checkpoints.best_tag() if best else None
        return {
            "run_dir": str(self.cfg.run_dir), "steps": self.step, "steps_this_session": self.step - start_step,
            "tokens_seen": self.tokens_seen, "wall_seconds": round(wall, 3), "final_val_loss": val.get("val/loss"), "final_val": val,
            "checkpoint": str(checkpoint), "max_steps": self.max_steps, "stopped_early": self.evaluator.stopped_early,
            "best_checkpoint": str(self.checkpoints.directory / best_tag) if best_tag else None,
            "tensorboard_dir": str(self.metrics.tb_dir), "resumed_from": self.resumed_from and str(self.resumed_from),
            "world_size": self.world_size, "parameters": self.model.total_params,
            "trainable_parameters": self.model.trainable_params, "config_fingerprint": self.cfg.fingerprint(),
            "preempted": self.preempted, "nonfinite_steps": self.guard.nonfinite_steps,
            "rollbacks": self.guard.rollbacks, "blend": self.data.blend, "items_cut": self.data.items_cut,
            "rss_before_model_gb": self.model.rss_before_model_gb,
            "best": ({"metric": best.metric, "mode": best.mode, "value": best.best_value, "step": best.best_step}
                     if best and best.best_value is not None else None),
        }

    def close(self) -> None:
        self.metrics.close()
