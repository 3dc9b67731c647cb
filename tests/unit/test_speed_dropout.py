"""The CPU dropout path (`train.model.use_cpu_dropout`, switch `train.fast_cpu_dropout`) computes what PyTorch's
dropout and its SDPA math path compute, given the same mask, and reproduces its masks from torch's RNG state (what
activation-checkpoint recomputation and resume rely on)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from train.model import CpuDropout, _cpu_causal_sdpa, keep_mask, use_cpu_dropout


class _Attention:
    is_causal = True


def _qkv(seed: int = 0, shape=(2, 3, 16, 8)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).bfloat16().requires_grad_() for _ in range(3)]


def test_keep_mask_is_dropouts_multiplier_and_follows_torchs_rng():
    torch.manual_seed(3)
    mask = keep_mask(torch.Size((500, 400)), 0.1, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(mask, keep_mask(torch.Size((500, 400)), 0.1, torch.float32))
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1.0).div_(0.9).item()}
    assert abs((mask > 0).float().mean().item() - 0.9) < 0.003  # 200,000 draws: ~4 standard deviations


def test_attention_equals_pytorch_math_path_given_the_same_mask():
    q, k, v = _qkv()
    torch.manual_seed(5)
    ours, _ = _cpu_causal_sdpa(_Attention(), q, k, v, None, dropout=0.1, scaling=8 ** -0.5)
    ours.float().square().sum().backward()
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(5)  # the same draw from torch's generator gives the same mask
    mask = keep_mask(torch.Size((2, 3, 16, 16)), 0.1, torch.float32) > 0
    reference = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.1, True, dropout_mask=mask)[0]
    reference = reference.transpose(1, 2)
    reference.float().square().sum().backward()
    assert torch.equal(ours, reference)
    for ours_grad, t in zip(ours_grads, (q, k, v)):
        torch.testing.assert_close(ours_grad, t.grad, rtol=0, atol=1e-2)  # bf16 inputs: one bf16 ulp at most


def test_attention_without_dropout_or_with_a_mask_is_transformers_sdpa():
    q, k, v = _qkv()
    for dropout, mask in ((0.0, None), (0.1, torch.ones(2, 1, 16, 16, dtype=torch.bool).tril())):
        torch.manual_seed(1)
        ours, _ = _cpu_causal_sdpa(_Attention(), q, k, v, mask, dropout=dropout, scaling=8 ** -0.5)
        torch.manual_seed(1)
        theirs, _ = sdpa_attention_forward(_Attention(), q, k, v, mask, dropout=dropout, scaling=8 ** -0.5)
        assert torch.equal(ours, theirs)


def test_cpu_dropout_is_torchs_formula_and_identity_in_eval():
    x = torch.randn(64, 32).bfloat16()
    layer = CpuDropout(0.2)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    assert torch.equal(out, x * keep_mask(x.shape, 0.2, x.dtype))
    assert torch.equal(layer.eval()(x), x)


def _restore_attention_functions(monkeypatch) -> None:
    """use_cpu_dropout installs its attention process-wide; other tests get transformers' own back."""
    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", dict(ALL_ATTENTION_FUNCTIONS._local_mapping))


def _tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=32, use_cache=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _train(model: torch.nn.Module, steps: int, seed: int = 0) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        ids = (torch.randint(0, 128, (4, 1), generator=generator) + torch.arange(32)) % 128  # learnable: counting
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 128).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_recomputation_reproduces_the_masks(monkeypatch):
    """Activation checkpointing recomputes each block, masks included: the gradients must be those of the
    forward pass that was run, i.e. equal to training without checkpointing."""
    _restore_attention_functions(monkeypatch)
    plain, checkpointed = _tiny_gpt2(), _tiny_gpt2()
    for model in (plain, checkpointed):
        use_cpu_dropout(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert _train(plain, 10) == _train(checkpointed, 10)


def test_ten_steps_match_torch_dropout_within_noise(monkeypatch):
    """The optimised path draws other masks than the reference (torch's dropout), so the losses differ by dropout
    noise only; with dropout off the two paths are the same computation."""
    _restore_attention_functions(monkeypatch)
    reference = _train(_tiny_gpt2(), 10)
    fast = _tiny_gpt2()
    use_cpu_dropout(fast)
    assert any(isinstance(m, CpuDropout) for m in fast.modules())
    optimised = _train(fast, 10)
    gaps = [abs(a - b) for a, b in zip(reference, optimised)]
    assert max(gaps) < 0.15 and sum(gaps) / len(gaps) < 0.05  # dropout noise here: about 0.02 a step
    assert optimised[-1] < optimised[0] - 1.0

    no_dropout = GPT2Config(vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=32, use_cache=False,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    reference = _train(AutoModelForCausalLM.from_config(no_dropout, attn_implementation="sdpa"), 10)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(no_dropout, attn_implementation="sdpa")
    use_cpu_dropout(model)
    assert _train(model, 10) == reference
