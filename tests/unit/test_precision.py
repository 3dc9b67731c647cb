"""train.precision: what `auto` resolves to on the hardware at hand, and the one-line errors and warnings of an
explicit precision the hardware cannot run (well)."""

import pytest
import torch

from train import precision
from train.errors import ConfigError

CPU = torch.device("cpu")


def test_auto_on_this_cpu_follows_its_flags():
    choice = precision.resolve("auto", CPU)
    assert choice.peak_precision == choice.precision and not choice.warning
    flags = precision._cpu_flags()
    if flags is None:  # not x86: the probe decided, and says so
        assert choice.reason.startswith("auto: bf16 matmul ")
        return
    present = sorted(flags & {"avx512_bf16", "amx_bf16"})
    assert choice.precision == ("bf16" if present else "fp32")
    assert choice.reason == (f"auto: CPU flags: {', '.join(present)} (native bf16 matmuls)" if present else
                             "auto: CPU flags: no avx512_bf16 or amx_bf16 (bf16 matmuls would run on a slow fallback)")


def test_the_probe_measures_both_dtypes_on_this_cpu():
    bf16, fp32 = precision.probe_cpu_bf16()
    assert bf16 > 0 and fp32 > 1e8  # any CPU runs an fp32 256x256 matmul above 0.1 GFLOP/s


def test_x86_flags_decide_without_probing(monkeypatch):
    monkeypatch.setattr(precision, "probe_cpu_bf16", lambda: pytest.fail("the flags alone decide"))
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx", "avx2", "fma"})
    assert precision.resolve("auto", CPU) == precision.Choice(
        "fp32", "auto", "auto: CPU flags: no avx512_bf16 or amx_bf16 (bf16 matmuls would run on a slow fallback)")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert precision.resolve("auto", CPU) == precision.Choice(
        "bf16", "auto", "auto: CPU flags: amx_bf16 (native bf16 matmuls)")


@pytest.mark.parametrize("bf16, fp32, expected", [(200e9, 90e9, "bf16"), (100e9, 90e9, "fp32"), (0.22e9, 90e9, "fp32")])
def test_without_readable_flags_a_clearly_faster_probe_picks_bf16(monkeypatch, bf16, fp32, expected):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: None)  # an ARM CPU, say
    monkeypatch.setattr(precision, "probe_cpu_bf16", lambda: (bf16, fp32))
    choice = precision.resolve("auto", CPU)
    assert choice.precision == expected
    assert choice.reason == (f"auto: bf16 matmul {bf16 / 1e9:.1f} GFLOP/s vs fp32 {fp32 / 1e9:.1f} GFLOP/s on "
                             f"{torch.get_num_threads()} thread(s), ratio {bf16 / fp32:.2f}")


def test_forced_bf16_on_a_slow_cpu_runs_with_a_warning_and_an_fp32_peak(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx", "avx2", "fma"})
    monkeypatch.setattr(precision, "probe_cpu_bf16", lambda: (0.22e9, 90e9))
    choice = precision.resolve("bf16", CPU)
    threads = torch.get_num_threads()
    assert choice.precision == "bf16"
    assert choice.warning == (
        "warning: train.precision is bf16 but this CPU is slow at it (CPU flags: no avx512_bf16 or amx_bf16 (bf16 "
        "matmuls would run on a slow fallback); bf16 matmul 0.2 GFLOP/s vs fp32 90.0 GFLOP/s on "
        f"{threads} thread(s), ratio 0.00); expect a much slower run than with auto or fp32")
    # Attention runs in fp32 on CPU: only the faster fp32 peak bounds the run's matmuls (MFU <= 100%).
    assert choice.peak_precision == "fp32"


def test_fp16_on_cpu_is_one_line_saying_what_to_use():
    with pytest.raises(ConfigError) as err:
        precision.resolve("fp16", CPU)
    assert str(err.value) == ("train.precision: fp16 cannot run on CPU (DeepSpeed's CPU accelerator has no fp16); use "
                              "auto (bf16 where this CPU is fast at it, else fp32), bf16 or fp32")


def test_explicit_fp32_wins():
    assert precision.resolve("fp32", CPU) == precision.Choice("fp32", "fp32", "set in the config")


def test_a_checkpoint_this_hardware_cannot_run_is_one_error_naming_both():
    with pytest.raises(ConfigError) as err:
        precision.check_runnable("fp16", CPU, "runs/r/checkpoints/step_8")
    assert str(err.value) == (
        "cannot resume runs/r/checkpoints/step_8: it was trained in fp16, which this CPU cannot run (fp16 cannot run "
        "on CPU (DeepSpeed's CPU accelerator has no fp16); use auto (bf16 where this CPU is fast at it, else fp32), "
        "bf16 or fp32); resume on hardware that runs fp16, or start a new run (another run.name)")
    assert precision.check_runnable("fp32", CPU, "x") == ""


def test_one_dtype_map():
    assert {p: precision.dtype_of(p) for p in precision.CONCRETE} == {
        "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize("name, bf16, requested, expected, reason", [
    ("NVIDIA H200", True, "auto", "bf16", "auto: NVIDIA H200 supports bf16"),
    ("Tesla V100-SXM2-32GB", False, "auto", "fp16", "auto: Tesla V100-SXM2-32GB has no bf16; fp16 with dynamic loss "
                                                    "scaling"),
    ("Tesla T4", False, "fp32", "fp32", "set in the config (Tesla T4)"),
])
def test_auto_on_a_gpu_is_bf16_where_supported_else_fp16(monkeypatch, name, bf16, requested, expected, reason):
    # No GPU on the test machines: the two CUDA queries resolve() makes answer as the named device would.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    choice = precision.resolve(requested, torch.device("cuda", 0))
    assert (choice.precision, choice.reason, choice.warning) == (expected, reason, "")


def test_bf16_forced_on_a_gpu_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError) as err:
        precision.resolve("bf16", torch.device("cuda", 0))
    assert str(err.value) == ("train.precision: bf16 is not supported by Tesla T4; use auto (fp16 with loss scaling "
                              "here) or fp16")
