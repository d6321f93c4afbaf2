"""Variational blocks (GSVR): Gaussian and Gaussian-mixture densities and KL divergences, pure functions.

Used by the variational ELBO (BCE + β·KL) that GSVR's `loss` returns; each is tested on its own.
"""

from __future__ import annotations

import math

import torch

_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(
    mu: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor, prior_var: torch.Tensor
) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(m, diag v)) per row, summed over dimensions: [B, D] → [B]."""
    var = logvar.exp()
    return 0.5 * (torch.log(prior_var) - logvar + (var + (mu - prior_mean) ** 2) / prior_var - 1.0).sum(-1)


def mixture_moments(pi: torch.Tensor, centres: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and diagonal variance of Σ_k π_k N(c_k, σ₀² I): π [B, K], centres [K, D] → ([B, D], [B, D])."""
    mean = pi @ centres
    second = pi @ (centres**2)
    return mean, (std**2 + second - mean**2).clamp(min=1e-6)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag σ²), summed over the last dimension."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


def mixture_log_prob(z: torch.Tensor, log_pi: torch.Tensor, centres: torch.Tensor, std: float) -> torch.Tensor:
    """log Σ_k π_k N(z; c_k, σ₀² I): z [..., B, D], log π [B, K], centres [K, D] → [..., B]."""
    d = z.shape[-1]
    sq = ((z.unsqueeze(-2) - centres) ** 2).sum(-1)  # [..., B, K]
    comp = -0.5 * (d * (_LOG_2PI + 2 * math.log(std)) + sq / std**2)
    return torch.logsumexp(log_pi + comp, dim=-1)


def mc_mixture_kl(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_pi: torch.Tensor, centres: torch.Tensor, std: float
) -> torch.Tensor:
    """Monte-Carlo KL(q ‖ mixture) per row from samples z [S, B, D] of q = N(μ, σ²): mean_s log q(z) − log p(z)."""
    return (gaussian_log_prob(z, mu, logvar) - mixture_log_prob(z, log_pi, centres, std)).mean(0)

