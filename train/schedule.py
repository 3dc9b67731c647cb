"""Learning-rate schedule as a pure function of the optimizer step.

Being pure, the schedule needs no state in checkpoints: after a resume `lr_at(step)` gives the same value an
uninterrupted run would have used.
"""

import math

from train.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 to `optim.lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`.

    `step` counts optimizer steps from 0; step 0 already gets a non-zero rate (lr / warmup_steps) so no step is
    wasted on lr = 0.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
