"""`python -m launcher plan`: its predictions against real 2-rank probe runs of the quick-start recipe on the tiny
shards, for every ZeRO stage, and --probe-layouts' real probes of every split of this machine's cores.

On CPU the ranks' resident memory is the measure. glibc keeps freed blocks in its heap (the trainer even asks it to,
for speed), so a rank's RSS can stay above what is live; with an explicit MALLOC_MMAP_THRESHOLD_ large blocks go
back to the system when freed (and the trainer leaves glibc alone), and the peak RSS is the live peak the plan
predicts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from launcher import plan
from train import config as config_lib
from tests.conftest import ROOT, TINY_MODEL

RECIPE = ROOT / "configs" / "quickstart.yaml"
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def overrides(tiny_data, stage: int) -> list[str]:
    return [f"data.path={tiny_data['shards']}", "train.micro_batch_size=16",
            f"train.deepspeed_config=ds_configs/zero{stage}.json"]


def test_plan_command_with_probe(tiny_data):
    proc = subprocess.run([sys.executable, "-m", "launcher", "plan", "--config", str(RECIPE), "--world-size", "2",
                           "--probe", *overrides(tiny_data, 2)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **LIVE_MEMORY})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^\* zero2 ", out, re.M) and re.search(r"^  zero3 \+ offload optimizer\+params ", out, re.M)
    off = re.search(r"predicted [\d,]+ MB \(([-+]\d+)%\)", out)
    assert off and abs(int(off.group(1))) <= 25, out
    disk = re.search(r"checkpoint: ([\d,]+) MB on disk \(predicted ([\d,]+) MB\)", out)
    measured, predicted = (int(x.replace(",", "")) for x in disk.groups())
    assert abs(predicted - measured) <= 0.1 * measured, out
    assert re.search(r"projected wall time of 200 steps: \d+m\d\ds \(3 checkpoint saves", out), out


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_predicted_memory_is_within_25_percent_of_the_measured_peak(tiny_data, stage, monkeypatch):
    for key, value in LIVE_MEMORY.items():
        monkeypatch.setenv(key, value)
    cfg = config_lib.load(RECIPE, overrides(tiny_data, stage))
    predicted = plan.estimate(cfg, world_size=2, gpu=False).configured.total(checkpointing=True)
    measured = plan.probe(str(RECIPE), overrides(tiny_data, stage), nproc=2)
    assert measured["peak_bytes"] == pytest.approx(predicted, rel=0.25), (predicted, measured)
    assert measured["tokens_per_s"] > 0 and measured["step_seconds"] > 0


def test_plan_of_a_pretrained_lora_classifier_counts_what_training_builds(tiny_data, finetune_data,
                                                                          pretrained_models):
    from train.data import open_split
    from train.model import build_model, count_parameters

    cfg = config_lib.load(ROOT / "configs" / "classify_lora.yaml",
                          [f"data.path={finetune_data['cls']}", f"model.path={pretrained_models['gpt2']}",
                           "data.seq_len=64"])
    p = plan.estimate(cfg, world_size=2, gpu=False)
    trainable, total = count_parameters(build_model(cfg, open_split(cfg, "train")[0]))
    assert (p.counts.trainable, p.counts.total) == (trainable, total) and trainable < total / 5
    assert p.configured.states.optimizer == 20 * trainable // 2  # only the adapters and the head have Adam state
    assert 0 < p.activations.checkpointed < p.activations.full


LAYOUT_ROW = re.compile(r"^  (\d+) rank\(s\) x (\d+) thread\(s\) +(\d+) +([\d,]+) +([\d.]+)  (\S+)$", re.M)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--probe-layouts is for CPU-only machines")
def test_probe_layouts_measures_every_split_of_the_cores_at_one_global_batch(tiny_data):
    """The tiny model (micro-batch 4) planned for 2 ranks: global batch 8 in every layout of this machine's cores."""
    args = [f"data.path={tiny_data['shards']}", *TINY_MODEL]
    proc = subprocess.run([sys.executable, "-m", "launcher", "plan", "--config", str(RECIPE), "--world-size", "2",
                           "--probe-layouts", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    cores = len(os.sched_getaffinity(0))
    divisors = [n for n in range(1, cores + 1) if cores % n == 0]
    fits = [n for n in divisors if 8 % (4 * n) == 0][:plan.MAX_LAYOUTS]
    assert "global batch 8 (micro-batch 4 x grad accumulation x ranks)" in out, out
    considered = divisors if len(fits) < plan.MAX_LAYOUTS else [n for n in divisors if n <= fits[-1]]
    assert re.findall(r"^  skipped (\d+) rank", out, re.M) == [str(n) for n in considered if n not in fits], out
    rows = [(int(n), int(t), int(accum), float(tps.replace(",", "")), float(step_s), wall)
            for n, t, accum, tps, step_s, wall in LAYOUT_ROW.findall(out)]
    assert [(n, t, accum) for n, t, accum, *_ in rows] == [(n, cores // n, 8 // (4 * n)) for n in fits], out
    assert all(4 * accum * n == 8 for n, _, accum, *_ in rows)  # the same global batch in every layout
    assert all(tps > 0 and step_s > 0 and re.fullmatch(r"(\d+h)?\d+m\d\ds", wall)
               for *_, tps, step_s, wall in rows), out
    recommended = re.search(r"^recommended: (\d+) rank\(s\) x (\d+) thread\(s\): (.*)$", out, re.M)
    assert recommended, out
    best = next(row for row in rows if row[:2] == (int(recommended.group(1)), int(recommended.group(2))))
    assert best[3] == max(row[3] for row in rows), out  # the most tokens/s in the table
    command = shlex.split(recommended.group(3))
    assert command[:6] == ["python", "-m", "launcher", "--config", str(RECIPE), "--nproc"]
    accum = [] if best[2] == 1 else [f"train.grad_accum_steps={best[2]}"]  # the recipe accumulates 1
    assert command[6:] == [str(best[0]), *args, *accum], out
