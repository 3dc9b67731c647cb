"""The one training loop for every task and fine-tuning method: build everything from a Config, train, evaluate,
track the best checkpoint, stop early, checkpoint, resume, and score the test split.

Each stateful part owns its state (`GlobalBatchSampler`, the DeepSpeed engine, per-rank RNG, `BestTracker`, the
counters here); `Checkpointer` gathers them. What differs between tasks is only the items a batch is made of
(`train.data`) and what is computed from the logits (`train.tasks`). Losses stay on the device and are read back
only at log and eval points; the one per-step host sync is a 3-integer all-reduce (preemption signal, non-finite
loss, tokens in the step) that keeps the ranks in step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import psutil
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
import torch
import torch.distributed as dist
import yaml

from train import ds_config as ds_config_lib
from train import faults, preemption, resume, tasks
from train import precision as precision_lib
from train.best import BestTracker
from train.checkpoint import Checkpointer, write_atomic
from train.config import RECORD_KIND_OF_TASK, Config
from train.data import IGNORE, BlendedItems, GlobalBatchSampler, eval_batches, open_split, run_steps, split_items
from train.distributed import init_distributed
from train.errors import ConfigError, RunError
from train.flops import model_flops, peak_flops
from train.metrics import Metrics
from train.model import build_model, cast_unpartitioned, count_parameters, param_groups, use_cpu_dropout
from train.rng import seed_everything
from train.schedule import lr_at


def _set_cpu_threads() -> None:
    """On CPU, ranks on one host share its cores; without a limit each rank starts one thread per core and they
    thrash. An explicit OMP_NUM_THREADS (set by the user or the launcher) wins."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def _keep_freed_memory() -> None:
    """On CPU with glibc, keep freed memory in the heap instead of returning it to the OS. Activations and logits
    of a step are tens of MB each; glibc serves such blocks with mmap and unmaps them on free, so every step
    page-faults (and zeroes) all of them again: ~18% of a GPT-2 step on the bench machine. The resident size
    stays at its high-water mark plus heap fragmentation instead of falling back between steps: about twice the
    live peak `python -m launcher plan` predicts, on the quick-start model."""
    libc = ctypes.util.find_library("c")
    if torch.cuda.is_available() or not libc or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # an explicit glibc setting wins (launcher.plan's probe measures live memory that way)
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None)  # glibc only (not musl, not macOS)
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 1 << 30)
        mallopt(m_trim_threshold, 1 << 30)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        init_distributed(cfg.train.collective_timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        _set_cpu_threads()
        _keep_freed_memory()
        self.run_dir = cfg.run_dir
        self.metrics = None

        self.kind = cfg.task.kind
        manifest, train_sets = open_split(cfg, cfg.data.train_split)
        record_kind = manifest.get("record_kind", "text")
        if record_kind != RECORD_KIND_OF_TASK[self.kind]:
            raise ConfigError(f"task.kind: {self.kind} trains on '{RECORD_KIND_OF_TASK[self.kind]}' shards but "
                              f"{cfg.data.path} holds '{record_kind}' records; set task.kind or tokenize with "
                              f"--record-kind {RECORD_KIND_OF_TASK[self.kind]}")
        self.num_labels = manifest["classification"]["num_labels"] if self.kind == "classification" else 0
        self.train_items = split_items(cfg, train_sets, manifest)
        self.val_items = self._split_items(cfg.data.val_split, manifest)
        self.test_items = self._split_items(cfg.data.test_split, manifest)
        # Examples longer than data.seq_len are cut (first seq_len - 1 tokens + the last): counted, never silent.
        self.items_cut = {split: items.num_cut() for split, items in
                          (("train", self.train_items), ("val", self.val_items), ("test", self.test_items))
                          if items is not None}
        self.blend = None  # [{path, weight, realised share per epoch}] when training on a blend
        if isinstance(self.train_items, BlendedItems):
            sampler = self.train_items.sampler
            self.blend = [{"path": str(s.directory), "weight": float(w), "realised": float(r)}
                          for s, w, r in zip(sampler.sets, sampler.weights, self.train_items.realised())]
        self.sampler = GlobalBatchSampler(len(self.train_items), cfg.train.micro_batch_size,
                                          cfg.train.grad_accum_steps, self.world_size, self.rank, cfg.run.seed)
        # Derived once, here: everything else (schedule, loop, logs) reads self.max_steps.
        self.steps_per_epoch, self.max_steps = run_steps(cfg, len(self.train_items), self.sampler.global_batch)
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.rank, cfg.train.keep_last,
                                         cfg.train.keep_every)
        found = self.checkpointer.find_latest()
        if found and cfg.run.resume == "never":
            raise ConfigError(f"run.resume: 'never' but {self.run_dir} already has checkpoint {found[0]}; "
                              "choose another run.name or set run.resume=auto")
        if not found and cfg.run.resume == "require":
            raise ConfigError(f"run.resume: 'require' but {self.checkpointer.directory} has no complete checkpoint")
        # From here on cfg.train.precision is the concrete precision (auto resolved), in config.yaml and the
        # checkpoint's identity too, so a resume compares what was actually trained.
        self.precision = self._resolve_precision(found)
        self.cfg = cfg = precision_lib.with_precision(cfg, self.precision.precision)
        ds_config = ds_config_lib.build(cfg, self.world_size)
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

        seed_everything(cfg.run.seed)  # same initial weights (and new heads, adapters) on every rank
        if ds_config_lib.zero_stage(ds_config) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Must stay referenced while the model is built: transformers checks it to partition at init.
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        # What the process holds before any model state (interpreter, torch, DeepSpeed, the data index, and
        # transformers' ~100 MB of model code, imported here rather than inside build_model): `python -m launcher
        # plan --probe` compares its prediction with the peak above this.
        import transformers.modeling_utils  # noqa: F401
        self.rss_before_model_gb = psutil.Process().memory_info().rss / 1e9
        model = build_model(cfg, manifest)
        if cfg.train.fast_cpu_dropout and not torch.cuda.is_available():
            use_cpu_dropout(model)
        if ds_config_lib.zero_stage(ds_config) == 3 and cfg.train.precision != "fp32":
            cast_unpartitioned(model, precision_lib.dtype_of(cfg.train.precision))
        self.trainable_params, self.total_params = count_parameters(model)
        self.flops = model_flops(model, cfg.data.seq_len)
        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.peak_flops, self.peak_flops_source = self._peak_flops()
        seed_everything(cfg.run.seed + self.rank)  # dropout masks differ between ranks

        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0  # steps whose loss or gradients were not finite
        self.rollbacks = 0
        self.best = (BestTracker(cfg.train.best_metric, cfg.train.best_mode, cfg.train.early_stopping_patience)
                     if cfg.train.best_metric else None)
        self.stopped_early = False
        self.test_before: dict | None = None  # test metrics of the starting model
        self._last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest validation pass
        self._nonfinite_batches: list[tuple[int, int]] = []  # the current run of non-finite steps
        self.last_checkpoint: Path | None = None  # and the step it holds is self.step right after save/resume
        self.last_checkpoint_step: int | None = None
        self.resumed_from = None
        if found:
            self._resume(tag, load_tag)
            self.resumed_from = str(self.last_checkpoint)
            self.stopped_early = bool(self.best and self.best.should_stop)  # a finished early-stopped run stays so

        self._progress = False  # a progress bar replaces the step log lines (rank 0, interactive terminal)
        self.preemption = preemption.PreemptionFlag()
        self.preempted = False
        self._step_flags = torch.zeros(3, dtype=torch.int64, device=self.engine.device)
        self._data_wait_s = 0.0  # seconds this rank spent building batches since the last log point
        self.metrics = Metrics(self.run_dir, enabled=self.rank == 0)
        if self.rank == 0:
            resolved = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            write_atomic(self.run_dir / "config.yaml", resolved.encode())
            # train.export / train.predict rebuild the model from these two files, without the shards.
            write_atomic(self.run_dir / "data_manifest.json", json.dumps(manifest, indent=1).encode())
            self.metrics.text("config", f"```\n{resolved}\n```")

    def _resolve_precision(self, found: tuple[str, dict] | None) -> precision_lib.Choice:
        """Collective: rank 0 resolves train.precision for this hardware (or keeps the checkpoint's on resume) and
        every rank takes its answer, so that all ranks train in one precision (or fail together)."""
        answer: list = [None]
        if self.rank == 0:
            device = torch.device(get_accelerator().current_device_name())
            requested = self.cfg.train.precision
            try:
                if found and requested == "auto":
                    trained = found[1]["identity"]["train"]["precision"]
                    checkpoint = self.checkpointer.directory / found[0]
                    warning = precision_lib.check_runnable(trained, device, str(checkpoint))
                    answer[0] = precision_lib.Choice(trained, requested, f"kept from {checkpoint} (a resumed run "
                                                     "keeps the precision it was trained in)", warning)
                else:  # an explicit precision that differs from the checkpoint's fails in resume.check_compatible
                    answer[0] = precision_lib.resolve(requested, device)
            except ConfigError as exc:
                answer[0] = str(exc)
        dist.broadcast_object_list(answer, src=0)
        if isinstance(answer[0], str):
            raise ConfigError(answer[0])
        if answer[0].warning and self.rank == 0:
            print(answer[0].warning, file=sys.stderr, flush=True)
        return answer[0]

    def _peak_flops(self) -> tuple[float, str]:
        """Peak FLOP/s of one rank (train.flops: a GPU table or a short matmul probe, all ranks at once so that
        they share the host as in training), averaged over the ranks; and where rank 0's number came from."""
        peak, source = peak_flops(self.engine.device, self.precision.peak_precision)
        total = torch.tensor([peak], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(total)
        return total.item() / self.world_size, source

    def _memory_peaks(self) -> tuple[float, float | None]:
        """(peak resident memory, peak CUDA memory allocated) in GB, each the maximum over the ranks: one small
        all-reduce, at log points and at the end."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        cuda = torch.cuda.is_available() and self.engine.device.type == "cuda"
        gpu = torch.cuda.max_memory_allocated(self.engine.device) if cuda else 0
        peaks = torch.tensor([rss / 1e9, gpu / 1e9], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        rss_gb, gpu_gb = peaks.tolist()
        return rss_gb, (gpu_gb if cuda else None)

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation of the ranks, from tokens/s over all of them."""
        return tokens_per_s / self.world_size * self.flops.flops_per_token / self.peak_flops

    def _split_items(self, split: str, manifest: dict):
        return split_items(self.cfg, open_split(self.cfg, split)[1], manifest) if split else None

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_steps": self.nonfinite_steps,
                "rollbacks": self.rollbacks, "test_before": self.test_before,
                "best": self.best.state_dict() if self.best else None}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.nonfinite_steps, self.rollbacks = state["nonfinite_steps"], state["rollbacks"]
        self.test_before = state.get("test_before")
        if self.best and state.get("best"):
            self.best.load_state_dict(state["best"])

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
                                            "identity": self._identity(), "precision": self.precision.as_dict()})
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        seconds = time.perf_counter() - start
        self.metrics.log(self.step, {"ckpt/save_seconds": seconds})
        self.metrics.print(f"checkpoint {path} ({seconds:.1f}s)")
        return path

    def checkpoint_now(self) -> Path:
        """A checkpoint of the current step: the one already written for it, or a new one."""
        return self.last_checkpoint if self.last_checkpoint_step == self.step else self.save()

    # ------------------------------------------------------------------------------------------------ loop
    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits for a batch (its labels already removed)."""
        device = self.engine.device
        return self.engine(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).logits

    def train_step(self) -> tuple[torch.Tensor, int]:
        """One optimizer step over grad_accum_steps micro-batches: (mean loss as a device tensor, this rank's
        tokens)."""
        lr = lr_at(self.step, self.cfg.optim, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.engine.device)
        tokens = 0
        for indices in self.sampler.next_step():
            start = time.perf_counter()
            batch, num_tokens = self.train_items.model_batch(indices)
            self._data_wait_s += time.perf_counter() - start
            labels = batch.pop("labels").to(self.engine.device, non_blocking=True)
            loss = tasks.loss(self.kind, self._forward(batch), labels, self.cfg.task.label_smoothing)
            loss = faults.poison(loss, self.sampler, self.rank)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed only updates at the accumulation boundary
            loss_sum += loss.detach().float()
            tokens += num_tokens
        self.step += 1
        return loss_sum / self.cfg.train.grad_accum_steps, tokens

    @torch.no_grad()
    def evaluate(self, items, split: str) -> dict[str, float]:
        """Metrics of one pass over `items` (train.eval_batches rounds, or all), named `<split>/<metric>`."""
        self.engine.eval()
        sums = tasks.EvalSums(self.kind, self.num_labels, self.engine.device)
        for indices in eval_batches(len(items), self.cfg.train.micro_batch_size, self.world_size, self.rank,
                                    self.cfg.train.eval_batches):
            # A rank with nothing left still runs a forward pass (ZeRO-3 gathers collectively) and counts nothing.
            batch, _ = items.model_batch(indices if len(indices) else np.array([len(items) - 1]))
            labels = batch.pop("labels")
            if not len(indices):
                labels.fill_(IGNORE)
            sums.add(self._forward(batch), labels.to(self.engine.device))
        dist.all_reduce(sums.sums)
        self.engine.train()
        metrics = sums.metrics()
        if not metrics:
            raise ConfigError(f"data.{split}_split: fewer than micro_batch_size x world size = "
                              f"{self.cfg.train.micro_batch_size * self.world_size} items to evaluate; use a larger "
                              f"split, train.eval_batches=0, or disable it with data.{split}_split=''")
        return {f"{split}/{name}": value for name, value in metrics.items()}

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

    def _log_train(self, train_loss: float, tokens: int, elapsed: float, steps: int) -> None:
        """Log one interval of `steps` steps (called on every rank: it reduces the memory peaks)."""
        tokens_per_s = tokens / elapsed
        data_wait_share, self._data_wait_s = self._data_wait_s / elapsed, 0.0
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr = lr_at(self.step - 1, self.cfg.optim, self.max_steps)
        rss_gb, gpu_gb = self._memory_peaks()
        scalars = {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/tokens_per_s": tokens_per_s, "data/tokens_seen": self.tokens_seen,
                   "data/epoch": self.step / self.steps_per_epoch,
                   "train/samples_per_s": steps * self.sampler.global_batch / elapsed,
                   "train/mfu": self._mfu(tokens_per_s), "sys/mem_rss_gb": rss_gb,
                   "data/wait_share": data_wait_share}
        if gpu_gb is not None:
            scalars["sys/gpu_mem_gb"] = gpu_gb
        self.metrics.log(self.step, scalars)
        self.metrics.log_tb(self.tokens_seen, {"tokens/train_loss": train_loss})
        if self._progress:
            self.metrics.progress(self.step, {"loss": f"{train_loss:.4f}", "tokens/s": f"{tokens_per_s:,.0f}"})
        else:
            self.metrics.print(f"step {self.step}/{self.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                               f"grad_norm {grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s")

    @staticmethod
    def _describe(metrics: dict[str, float]) -> str:
        return " | ".join(f"{name} {value:.4f}" for name, value in metrics.items())

    def _log_eval(self) -> dict[str, float]:
        """Validate (if there is a validation split), log, and track the best checkpoint; {} without a split."""
        if self.val_items is None:
            return {}
        metrics = self.evaluate(self.val_items, "val")
        self._last_eval = (self.step, metrics)
        self.metrics.log(self.step, metrics)
        self.metrics.print(f"step {self.step} | {self._describe(metrics)}")
        if self.best:
            if self.best.metric not in metrics:
                raise ConfigError(f"train.best_metric: {self.best.metric} is not reported for task.kind "
                                  f"{self.kind}; choose one of {', '.join(metrics)}")
            if self.best.update(self.step, metrics[self.best.metric]):
                self.checkpoint_now()
                self.checkpointer.mark_best(self.step)
                self.metrics.print(f"step {self.step}: new best {self.best.metric} {self.best.best_value:.4f}")
            self.stopped_early = self.best.should_stop
        return metrics

    def _at_epoch_end(self) -> bool:
        """Whether the step just taken was the last full global batch of its epoch."""
        s = self.sampler
        return s.position + s.global_batch > s.num_windows

    def _test(self) -> dict | None:
        """Score the test split with the best checkpoint's weights (the final ones when no best is tracked) and
        write results.json. The engine keeps those weights afterwards; the final checkpoint is already saved."""
        best_tag = self.checkpointer.best_tag() if self.best else None
        results = {"task": self.kind, "steps": self.step, "stopped_early": self.stopped_early,
                   "best": ({**self.best.state_dict(), "checkpoint": str(self.checkpointer.directory / best_tag)}
                            if best_tag else None),
                   "val_final": self._last_eval[1] if self._last_eval else None}
        if self.test_items is not None:
            if best_tag and self.best.best_step != self.step:
                self.checkpointer.load_weights(self.engine, best_tag)
            test_after = self.evaluate(self.test_items, "test")
            self.metrics.log(self.step, test_after)
            self.metrics.print(f"test with the {'best' if best_tag else 'final'} model: {self._describe(test_after)}")
            # test_before is None when the run was started without data.test_split and it was added on resume.
            results.update(test_before=self.test_before, test_after=test_after,
                           test_gain={k: test_after[k] - self.test_before[k] for k in test_after}
                           if self.test_before else None)
        if self.rank == 0:
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=2).encode())
        return results

    def fit(self) -> dict:
        cfg, train = self.cfg, self.cfg.train
        self.metrics.print(
            f"run {self.run_dir} | {self.world_size} ranks | {self.total_params:,} parameters "
            f"({self.trainable_params:,} trainable) | {self.kind}, {cfg.model.init}, {cfg.finetune.method} | global "
            f"batch {self.sampler.global_batch} | {len(self.train_items):,} training items, "
            f"{self.steps_per_epoch:,} steps per epoch, {self.max_steps:,} steps"
            + (f" | resumed from {self.resumed_from}" if self.resumed_from else "")
            + f"\nprecision {self.precision.precision} ({self.precision.reason})")
        if self.config_changes:
            self.metrics.print(f"resumed with changed settings: {'; '.join(self.config_changes)}")
        if any(self.items_cut.values()):
            self.metrics.print(f"data.seq_len={cfg.data.seq_len} cuts items longer than that (each keeps its first "
                               f"{cfg.data.seq_len - 1} tokens and its last): "
                               + ", ".join(f"{n:,} {split}" for split, n in self.items_cut.items()))
        for part in self.blend or []:
            self.metrics.print(f"blend: {part['path']} weight {part['weight']:.4f}, realised {part['realised']:.4f} "
                               f"of each epoch's {len(self.train_items):,} samples")
        if self.test_items is not None and self.test_before is None and self.step == 0:
            self.test_before = self.evaluate(self.test_items, "test")  # the starting model, kept across resumes
            self.metrics.log(self.step, self.test_before)
            self.metrics.print(f"test with the starting model: {self._describe(self.test_before)}")
        fit_start = time.perf_counter()
        start_step, start_tokens = self.step, self.tokens_seen
        interval_loss = torch.zeros((), device=self.engine.device)
        interval_steps, interval_tokens, interval_start = 0, 0, time.perf_counter()
        train_loss = None
        self._progress = self.metrics.start_progress(self.max_steps, self.step)
        while self.step < self.max_steps and not self.stopped_early:
            step_loss, tokens = self.train_step()
            signalled, nonfinite, step_tokens = self._agree(step_loss, tokens)
            if nonfinite:
                if self._on_nonfinite():  # rolled back: the interval's losses belong to undone steps
                    interval_loss.zero_()
                    self._data_wait_s = 0.0
                    interval_steps, interval_tokens, interval_start = 0, 0, time.perf_counter()
            else:
                self._nonfinite_batches.clear()
                self.tokens_seen += step_tokens
                interval_loss += step_loss
                interval_steps += 1
                interval_tokens += step_tokens
            if interval_steps and (self.step % train.log_every == 0 or self.step == self.max_steps):
                # Losses stay on the device between log points: one all-reduce and one read per interval.
                dist.all_reduce(interval_loss)
                train_loss = interval_loss.item() / (self.world_size * interval_steps)
                self._log_train(train_loss, interval_tokens, time.perf_counter() - interval_start, interval_steps)
                interval_loss.zero_()
                interval_steps, interval_tokens, interval_start = 0, 0, time.perf_counter()
            if self.step < self.max_steps and not nonfinite:
                if ((train.eval_every and self.step % train.eval_every == 0)
                        or (train.eval_at_epoch_end and self._at_epoch_end())):
                    self._log_eval()
                if train.save_every and self.step % train.save_every == 0:
                    self.checkpoint_now()
            self.metrics.progress(self.step)
            faults.inject("after_step", self.step, self.rank)
            if signalled and self.step < self.max_steps and not self.stopped_early:
                self.preempted = True
                break
        wall = time.perf_counter() - fit_start
        self.metrics.end_progress()
        self._progress = False
        if self.preempted:
            checkpoint = self.checkpoint_now()
            signalled = self.preemption.received_at
            self.metrics.print(f"preempted ({self.preemption.received or 'signal on another rank'}) at step "
                               f"{self.step}: checkpoint {checkpoint} on disk "
                               + (f"{time.time() - signalled:.1f}s after the signal" if signalled else ""))
        else:
            if self._last_eval is None or self._last_eval[0] != self.step:
                self._log_eval()
            checkpoint = self.checkpoint_now()
            if self.stopped_early:
                self.metrics.print(f"early stop at step {self.step}: {self.best.metric} did not improve for "
                                   f"{self.best.patience} evaluations (best {self.best.best_value:.4f} at step "
                                   f"{self.best.best_step})")
        val = self._last_eval[1] if self._last_eval else {}
        best_tag = self.checkpointer.best_tag() if self.best else None
        steps_run = self.step - start_step
        rss_gb, gpu_gb = self._memory_peaks()
        mean_tokens_per_s = (self.tokens_seen - start_tokens) / wall if steps_run else None
        best = self.best
        summary = {
            "run_dir": str(self.run_dir), "steps": self.step, "steps_this_session": steps_run,
            "tokens_seen": self.tokens_seen, "wall_seconds": round(wall, 3),
            "mean_tokens_per_s": mean_tokens_per_s,
            "final_train_loss": train_loss, "final_val_loss": val.get("val/loss"), "final_val": val,
            "checkpoint": str(checkpoint), "max_steps": self.max_steps, "stopped_early": self.stopped_early,
            "best_checkpoint": str(self.checkpointer.directory / best_tag) if best_tag else None,
            "tensorboard_dir": str(self.metrics.tb_dir), "resumed_from": self.resumed_from,
            "world_size": self.world_size, "parameters": self.total_params,
            "config_fingerprint": cfg.fingerprint(), "preempted": self.preempted,
            "nonfinite_steps": self.nonfinite_steps, "rollbacks": self.rollbacks, "blend": self.blend,
            "items_cut": self.items_cut,
            "trainable_parameters": self.trainable_params, "flops_per_token": self.flops.flops_per_token,
            "peak_flops_per_rank": self.peak_flops, "peak_flops_source": self.peak_flops_source,
            "peak_flops_precision": self.precision.peak_precision, "precision": self.precision.as_dict(),
            "mean_mfu": self._mfu(mean_tokens_per_s) if mean_tokens_per_s is not None else None,
            "peak_rss_gb": rss_gb, "rss_before_model_gb": self.rss_before_model_gb, "peak_gpu_mem_gb": gpu_gb,
            "best": ({"metric": best.metric, "mode": best.mode, "value": best.best_value, "step": best.best_step}
                     if best and best.best_value is not None else None),
        }
        if self.rank == 0:
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        if self.preempted:
            self.metrics.print(self._summary_table(summary))
            return summary
        results = self._test()
        self._log_hparams(summary, results)
        self.metrics.print(f"done: {self.step} steps, {self._describe(val) or 'no validation split'}, checkpoint "
                           f"{checkpoint}" + (f", best {results['best']['checkpoint']}" if results["best"] else "")
                           + f"\nTensorBoard: tensorboard --logdir {self.metrics.tb_dir}")
        self.metrics.print(self._summary_table(summary))
        return summary

    def _log_hparams(self, summary: dict, results: dict) -> None:
        """TensorBoard HParams of a completed run: every scalar config value (dotted keys) and the run's size, with
        its final metrics under hparams/, so runs compare side by side."""
        hparams = {}
        for section, values in self.cfg.to_dict().items():
            for key, value in values.items():
                if isinstance(value, (bool, int, float, str)):
                    hparams[f"{section}.{key}"] = value
                elif value is not None:
                    hparams[f"{section}.{key}"] = json.dumps(value, sort_keys=True)
        hparams.update(world_size=self.world_size, global_batch=self.sampler.global_batch,
                       parameters=self.total_params, trainable_parameters=self.trainable_params)
        final = {"hparams/final_train_loss": summary["final_train_loss"], "hparams/mean_mfu": summary["mean_mfu"],
                 "hparams/mean_tokens_per_s": summary["mean_tokens_per_s"]}
        if summary["best"]:
            final[f"hparams/best/{summary['best']['metric']}"] = summary["best"]["value"]
        for name, value in {**(results.get("val_final") or {}), **(results.get("test_after") or {})}.items():
            final[f"hparams/{name}"] = value
        self.metrics.hparams(hparams, final, self.step)

    @staticmethod
    def _summary_table(summary: dict) -> str:
        """The end-of-run summary as a few aligned lines (summary.json has it all)."""
        def number(value, spec):
            return "n/a" if value is None else format(value, spec)

        rows = [("steps", f"{summary['steps']:,}/{summary['max_steps']:,} ({summary['steps_this_session']:,} this "
                          "session)" + (", preempted" if summary["preempted"] else "")
                          + (", stopped early" if summary["stopped_early"] else "")),
                ("tokens", f"{summary['tokens_seen']:,}"),
                ("wall time", f"{summary['wall_seconds']:,.1f} s"),
                ("tokens/s", number(summary["mean_tokens_per_s"], ",.0f") + " (mean over the session)"),
                ("MFU", (number(summary["mean_mfu"] * 100 if summary["mean_mfu"] is not None else None, ".2f")
                         + f"% of {summary['peak_flops_per_rank']:.3g} FLOP/s per rank "
                         f"({summary['peak_flops_source']})")),
                ("peak memory", f"{summary['peak_rss_gb']:.2f} GB RSS"
                 + (f", {summary['peak_gpu_mem_gb']:.2f} GB GPU" if summary["peak_gpu_mem_gb"] is not None else ""))]
        if summary["best"]:
            best = summary["best"]
            rows.append((f"best {best['metric']}", f"{best['value']:.4f} at step {best['step']}"))
        for name, value in summary["final_val"].items():
            rows.append((f"final {name}", f"{value:.4f}"))
        rows.append(("checkpoint", summary["checkpoint"]))
        width = max(len(name) for name, _ in rows)
        return "run summary\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
