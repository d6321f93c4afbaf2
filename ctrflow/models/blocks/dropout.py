"""Inverted dropout whose mask is drawn by numpy's PCG64: the same operation as `nn.Dropout`, ~4x cheaper on CPU.

Why: DGenCTR's Transformer spent 36% of its CPU time in torch's `bernoulli_` (the dropout masks; torch draws them
with one serial Mersenne Twister) at batch 4096 on ML-1M (issue 12, `benchmarks/train_speed.py`). numpy's PCG64 fills
16-bit integers about 4x faster; an element is kept when its integer is below round((1 - p) * 2^16), so the keep
probability is exact to 2^-17 (0.899994 for p = 0.1), and kept elements are scaled by 1 / (1 - p) as in `nn.Dropout`.
What changes is only the random stream: a seed for the mask is drawn from torch's global generator at each call,
so `torch.manual_seed` still makes a run reproducible. Off the CPU (or in eval mode, or p = 0) it is `F.dropout`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16


class FastDropout(nn.Module):
    """`nn.Dropout(p)` with a numpy PCG64 mask on CPU (see the module docstring). Input and output: any shape."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"FastDropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.threshold = int(round((1.0 - self.p) * LEVELS))

    def keep_mask(self, shape: torch.Size) -> torch.Tensor:
        """A bool mask of `shape`: each element True with probability threshold / 2^16."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        draws = np.random.Generator(np.random.PCG64(seed)).integers(0, LEVELS, size=tuple(shape), dtype=np.uint16)
        return torch.from_numpy(draws < self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        return x * self.keep_mask(x.shape).to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(module: nn.Module) -> int:
    """Replace every `nn.Dropout` child of `module` (recursively) by a `FastDropout` of the same p; returns how many.
    Dropout inside fused kernels (`nn.MultiheadAttention`'s attention weights) is not a module and stays torch's."""
    replaced = 0
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, FastDropout(child.p))
            replaced += 1
        else:
            replaced += use_fast_dropout(child)
    return replaced
