"""Baseline for `bench/train_throughput.py`: the same model, data and DeepSpeed config trained by the Hugging Face
`Trainer` instead of `train/`.

Launched by the bench as `deepspeed --num_gpus N bench/hf_trainer_baseline.py --ds-config ds.json ...`. Every input
that defines the training math comes from the bench, which derives it from our run config: the DeepSpeed config
dict (`train.ds_config.build`), the transformers model config (`train.model.build_hf_config`), the token shards, and
the AdamW / clipping hyper-parameters. The optimizer uses the same parameter groups as `train.model.param_groups`
(decay on matrices only) at a constant learning rate, so only the training loop differs between the two runs.

Timing: a `TrainerCallback` records `time.perf_counter()` at every `on_step_end` (after the optimizer step) and the
loss HF logs every step; rank 0 writes both to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `train` importable
from train.distributed import skip_cpu_shm_kernel  # noqa: E402  (same process-group start-up as our trainer)
from train.model import param_groups  # noqa: E402  (the same AdamW groups as our trainer)


class TokenWindowDataset(torch.utils.data.Dataset):
    """Non-overlapping `seq_len` windows of each train shard (a window never crosses a shard), labels = input_ids;
    the same windows `train.data.TokenWindows` cuts from the same files."""

    def __init__(self, data_dir: Path, split: str, seq_len: int):
        manifest = json.loads((data_dir / "manifest.json").read_text())
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.seq_len = seq_len
        self.shards = [np.memmap(data_dir / shard["file"], dtype=dtype, mode="r")
                       for shard in manifest["splits"][split]["shards"]]
        per_shard = np.array([len(s) // seq_len for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        offset = int(index - self.starts[shard]) * self.seq_len
        ids = torch.from_numpy(np.asarray(self.shards[shard][offset:offset + self.seq_len], dtype=np.int64))
        return {"input_ids": ids, "labels": ids}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ds-config", required=True, help="DeepSpeed config JSON (built by train.ds_config.build)")
    p.add_argument("--model-config", required=True, help="directory with the transformers config.json of the model")
    p.add_argument("--data", required=True, help="token shard directory (manifest.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--betas", type=float, nargs=2, required=True)
    p.add_argument("--eps", type=float, required=True)
    p.add_argument("--weight-decay", type=float, required=True)
    p.add_argument("--grad-clip", type=float, required=True)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-dir", required=True, help="Trainer output_dir (nothing is saved there)")
    p.add_argument("--out", required=True, help="JSON file rank 0 writes: per-step times and losses")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import (AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments,
                              set_seed)

    ds_config = json.loads(Path(args.ds_config).read_text())
    skip_cpu_shm_kernel()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_end = {}  # global_step -> perf_counter() after that optimizer step
            self.loss = {}  # global_step -> loss HF logged for that step (mean over ranks)
            self.train_begin = None

        def on_train_begin(self, targs, state, control, **kwargs):
            self.train_begin = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            self.step_end[state.global_step] = time.perf_counter()

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss[state.global_step] = float(logs["loss"])

    class BaselineTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(param_groups(model or self.model, args.weight_decay), lr=args.lr,
                                                   betas=tuple(args.betas), eps=args.eps)
            return self.optimizer

    # TrainingArguments first: with ZeRO-3 it registers the DeepSpeed config that makes transformers build the model
    # partitioned (zero.Init), exactly as train/ does with HfDeepSpeedConfig.
    #
    # HF's DeepSpeed path assumes a GPU. On a CPU-only machine (the DeepSpeed CPU accelerator, which train/ uses) two
    # GPU-only probes are bridged while the arguments are built, and only then:
    #  - TrainingArguments rejects bf16=True without use_cpu=True, and use_cpu=True makes accelerate drop DeepSpeed
    #    (plain DDP instead); so the GPU-bf16 probe answers whether DeepSpeed's accelerator supports bf16.
    #  - accelerate finds no process-group backend without a GPU and then treats the run as 1 process (HF would
    #    compute a train_batch_size for 1 rank); so the backend is the one DeepSpeed uses on this accelerator (gloo).
    # Nothing else changes: DeepSpeed itself, the engine and the training loop are HF's and DeepSpeed's own code.
    import transformers.training_args as training_args_module
    from accelerate.state import PartialState
    from deepspeed.accelerator import get_accelerator

    bf16_probe = training_args_module.is_torch_bf16_gpu_available
    prepare_backend = PartialState._prepare_backend
    if not torch.cuda.is_available():
        if args.precision == "bf16" and not bf16_probe() and get_accelerator().is_bf16_supported():
            training_args_module.is_torch_bf16_gpu_available = lambda *a, **k: True

        def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
            backend, distributed_type = prepare_backend(self, cpu, sagemaker_dp, backend)
            if backend is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
                backend = get_accelerator().communication_backend_name()
            return backend, distributed_type

        PartialState._prepare_backend = _prepare_backend
    try:
        targs = TrainingArguments(
            output_dir=args.output_dir,
            deepspeed=ds_config,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            adam_beta1=args.betas[0],
            adam_beta2=args.betas[1],
            adam_epsilon=args.eps,
            weight_decay=args.weight_decay,
            max_grad_norm=args.grad_clip,
            activation_checkpointing=args.activation_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if args.activation_checkpointing else None,
            logging_steps=1,
            logging_strategy="steps",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            disable_tqdm=True,
            seed=args.seed,
        )
        world_size = targs.world_size  # sets up the process group and accelerate's state inside this window
    finally:
        training_args_module.is_torch_bf16_gpu_available = bf16_probe
        PartialState._prepare_backend = prepare_backend
    if world_size != int(os.environ.get("WORLD_SIZE", "1")):
        raise SystemExit(f"error: HF sees {world_size} processes, the launcher started {os.environ.get('WORLD_SIZE')}")
    rank = targs.process_index

    hf_config = AutoConfig.from_pretrained(args.model_config)
    set_seed(args.seed)  # train/ seeds with run.seed right before building the model, too
    model = AutoModelForCausalLM.from_config(hf_config)
    model.loss_type = "ForCausalLM"
    dataset = TokenWindowDataset(Path(args.data), args.split, args.seq_len)

    timer = StepTimer()
    trainer = BaselineTrainer(model=model, args=targs, train_dataset=dataset, callbacks=[timer])
    if not trainer.is_deepspeed_enabled:
        raise SystemExit("error: the HF Trainer is not using DeepSpeed; the baseline would not be comparable")
    print(f"[rank {rank}] hf baseline: deepspeed enabled, ZeRO stage "
          f"{ds_config.get('zero_optimization', {}).get('stage', 0)}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}, torch threads {torch.get_num_threads()}, "
          f"{len(dataset):,} windows, activation checkpointing {args.activation_checkpointing}", flush=True)
    trainer.train()
    engine = trainer.model_wrapped
    used = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    is_engine = hasattr(engine, "zero_optimization_stage")

    if rank == 0:
        result = {
            "deepspeed_enabled": trainer.is_deepspeed_enabled,
            "engine_class": type(engine).__name__,
            "engine_zero_stage": engine.zero_optimization_stage() if is_engine else None,
            "engine_bf16": engine.bfloat16_enabled() if is_engine else None,
            "engine_fp16": engine.fp16_enabled() if is_engine else None,
            "engine_train_batch_size": engine.train_batch_size() if is_engine else None,
            "engine_gradient_clipping": engine.gradient_clipping() if is_engine else None,
            "engine_optimizer": type(engine.optimizer).__name__ if is_engine else None,
            "base_optimizer": type(getattr(engine.optimizer, "optimizer", None)).__name__ if is_engine else None,
            # Top-level keys of the DeepSpeed config the engine was built from that differ from --ds-config.
            "ds_config_changes": {key: [ds_config.get(key), used.get(key)] for key in sorted(set(ds_config) | set(used))
                                  if ds_config.get(key) != used.get(key)},
            "world_size": targs.world_size,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
            "tokens_per_step": args.micro_batch * args.grad_accum * targs.world_size * args.seq_len,
            "train_begin": timer.train_begin,
            "step_end": {str(k): v for k, v in sorted(timer.step_end.items())},
            "loss": {str(k): v for k, v in sorted(timer.loss.items())},
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"hf baseline: wrote {args.out}", flush=True)
    # Ranks leave together, as train/main.py does: a rank that tears down its gloo group while rank 0 still writes
    # can abort at exit ('terminate called without an active exception') and fail the bench after a good run.
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
