"""`python -m launcher plan`: its predictions against real 2-rank probe runs of the quick-start recipe on the tiny
shards, for every ZeRO stage.

On CPU the ranks' resident memory is the measure. glibc keeps freed blocks in its heap (the trainer even asks it to,
for speed), so a rank's RSS can stay above what is live; with an explicit MALLOC_MMAP_THRESHOLD_ large blocks go
back to the system when freed (and the trainer leaves glibc alone), and the peak RSS is the live peak the plan
predicts.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from launcher import plan
from train import config as config_lib
from tests.conftest import ROOT

RECIPE = ROOT / "configs" / "quickstart.yaml"
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def overrides(tiny_data, stage: int) -> list[str]:
    return [f"data.path={tiny_data['shards']}", "train.micro_batch_size=16",
            f"train.deepspeed_config=ds_configs/zero{stage}.json"]


def test_plan_command_with_probe(tiny_data):
    proc = subprocess.run([sys.executable, "-m", "launcher", "plan", "--config", str(RECIPE), "--world-size", "2",
                           "--probe", *overrides(tiny_data, 2)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, **LIVE_MEMORY})
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
