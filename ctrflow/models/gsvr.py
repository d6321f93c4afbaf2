"""GSVR: a global-distribution-aware, scenario-specific variational plug-in for multi-scenario CTR models.

Shared representations blur what is unique to a scenario; scenario-specific ones starve in sparse scenarios.
GSVR (arXiv 2508.14493) gives every (user, scenario) and (item, scenario) pair a Gaussian posterior and regularises
it with a *global*, knowledge-aware multinomial prior, so users with similar behaviour (items with similar side
information) get similar distributions and a user with a handful of rows in one scenario is pulled towards what
its behaviour elsewhere says. Our reading of the paper ([ours] in METHODS.md, every choice a parameter):

- posterior q(z_us) = N(μ, σ²) with [μ, log σ²] = MLP([e_u; e_s] (+ `user_posterior_fields`)), and
  q(z_is) from MLP([e_i; e_s; side information]); reparameterised sample in training, μ at inference;
- prior (`prior: global`): K learned prototypes c_k per side and a multinomial π = softmax(cos(W g, c_k)/τ), where
  g is the user's cross-scenario behaviour (the pooled behaviour-sequence item embeddings) or the item's side
  information; p(z) = Σ_k π_k N(c_k, σ₀² I). A user with no behaviour gets a uniform π. `prior: standard` is the
  N(0, I) ablation;
- KL (`kl`): `mc` = log q(z) − log p(z) at the reparameterised sample(s) (unbiased for the mixture), `moment` =
  closed form against the moment-matched Gaussian of the mixture; the standard prior always uses the closed form;
- loss = BCE + β·(KL_user + KL_item), β warmed up linearly over `kl_warmup_epochs` (the trainer's set_epoch),
  reported as the named losses bce, kl_user, kl_item, beta;
- z_us and z_is enter the backbone next to its usual inputs (concatenated to the flattened field embeddings).

The backbone is any `MultiScenarioModel` (sharedbottom, mmoe, ple, star), built with its own nested parameters.
Unknown scenario at serving (encoded 0): the scenario embedding is the zero vector, so the posteriors condition on
the user/item alone, and the backbone falls back to its shared/centre parameters (see `MultiScenarioModel` in ctrflow/models/base.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import Entity, FieldKind, FieldSpec
from ctrflow.models import build_model, register_model
from ctrflow.models.base import CTRModel, MultiScenarioModel
from ctrflow.models.blocks.embedding import FieldEmbedding
from ctrflow.models.blocks.mlp import MLP
from ctrflow.models.blocks.variational import gaussian_kl, mc_mixture_kl, mixture_moments

BACKBONES = ("star", "mmoe", "ple", "sharedbottom")
PRIORS = ("global", "standard")
KLS = ("mc", "moment")


# ---- the model ------------------------------------------------------------------------------------------------
class _Side(nn.Module):
    """One side (user or item): posterior network, prototypes and the prior's key projection."""

    def __init__(
        self, in_dim: int, prior_dim: int, latent_dim: int, hidden: Sequence[int], prototypes: int, init_std: float
    ):
        super().__init__()
        self.posterior = MLP(in_dim, hidden, out_dim=2 * latent_dim)
        self.prototypes = nn.Parameter(torch.randn(prototypes, latent_dim) * init_std)
        # no bias: an empty behaviour / side vector keys to 0 → cosine 0 with every prototype → a uniform π
        self.key = nn.Linear(prior_dim, latent_dim, bias=False) if prior_dim else None


@register_model
class GSVR(CTRModel):
    name = "gsvr"

    def __init__(
        self,
        encoder: FeatureEncoder,
        backbone: str = "star",
        backbone_params: Mapping[str, Any] | None = None,
        embedding_dim: int = 16,
        latent_dim: int = 16,
        posterior_hidden: Sequence[int] = (64,),
        user_posterior_fields: Sequence[str] = (),
        item_side_fields: Sequence[str] | None = None,
        user_prior_fields: Sequence[str] | None = None,
        prior: str = "global",
        kl: str = "mc",
        prototypes: int = 8,
        prototype_init_std: float = 1.0,
        prior_std: float = 0.5,
        temperature: float = 0.2,
        beta: float = 0.01,
        kl_warmup_epochs: int = 3,
        mc_samples: int = 1,
        logvar_min: float = -8.0,
        logvar_max: float = 4.0,
        share_embeddings: bool = True,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"gsvr: backbone must be one of {BACKBONES}, got '{backbone}'")
        if prior not in PRIORS:
            raise ValueError(f"gsvr: prior must be one of {PRIORS}, got '{prior}'")
        if kl not in KLS:
            raise ValueError(f"gsvr: kl must be one of {KLS}, got '{kl}'")
        for key, value, low in (
            ("latent_dim", latent_dim, 1),
            ("prototypes", prototypes, 1),
            ("mc_samples", mc_samples, 1),
        ):
            if int(value) < low:
                raise ValueError(f"gsvr: {key} must be >= {low}, got {value}")
        if prior_std <= 0 or temperature <= 0 or beta < 0 or kl_warmup_epochs < 0:
            raise ValueError(
                f"gsvr: needs prior_std > 0, temperature > 0, beta >= 0, kl_warmup_epochs >= 0; got {prior_std}, "
                f"{temperature}, {beta}, {kl_warmup_epochs}"
            )
        spec = encoder.spec
        bparams = {"embedding_dim": int(embedding_dim), **dict(backbone_params or {})}
        bparams.pop("extra_dim", None)
        item_side = (
            _default_fields(spec, Entity.ITEM, spec.item_key) if item_side_fields is None else list(item_side_fields)
        )
        user_prior = _default_user_prior(spec) if user_prior_fields is None else list(user_prior_fields)
        user_post = list(user_posterior_fields)
        super().__init__(
            encoder,
            backbone=backbone,
            backbone_params=bparams,
            embedding_dim=int(embedding_dim),
            latent_dim=int(latent_dim),
            posterior_hidden=[int(h) for h in posterior_hidden],
            user_posterior_fields=user_post,
            item_side_fields=item_side,
            user_prior_fields=user_prior,
            prior=prior,
            kl=kl,
            prototypes=int(prototypes),
            prototype_init_std=float(prototype_init_std),
            prior_std=float(prior_std),
            temperature=float(temperature),
            beta=float(beta),
            kl_warmup_epochs=int(kl_warmup_epochs),
            mc_samples=int(mc_samples),
            logvar_min=float(logvar_min),
            logvar_max=float(logvar_max),
            share_embeddings=bool(share_embeddings),
        )
        self.latent_dim = int(latent_dim)
        self.prior, self.kl_kind = prior, kl
        self.prior_std, self.temperature = float(prior_std), float(temperature)
        self.beta, self.kl_warmup_epochs, self.mc_samples = float(beta), int(kl_warmup_epochs), int(mc_samples)
        self.logvar_range = (float(logvar_min), float(logvar_max))
        self.beta_scale = 1.0  # set_epoch lowers it during the warm-up

        bb = build_model(backbone, encoder, {**bparams, "extra_dim": 2 * self.latent_dim})
        if not isinstance(bb, MultiScenarioModel):
            raise TypeError(f"gsvr: backbone '{backbone}' is not a multi-scenario model")
        self.backbone = bb

        self.user_key, self.item_key, self.scenario_field = spec.user_key, spec.item_key, spec.scenario_field
        self.user_post_fields = [spec[n] for n in user_post]
        self.item_side_fields = [spec[n] for n in item_side]
        self.user_prior_fields = [spec[n] for n in user_prior]
        needed = list(
            dict.fromkeys([self.user_key, self.item_key, self.scenario_field, *user_post, *item_side, *user_prior])
        )
        shared = bb.embedding
        if share_embeddings and all(n in shared.field_names for n in needed):
            self.embedding = shared  # one embedding space with the backbone (and with pre-trained tables)
            self._own_embedding = False
        else:
            self.embedding = FieldEmbedding(encoder, int(embedding_dim), fields=needed)
            self._own_embedding = True
        d = self.embedding.dim
        hidden = [int(h) for h in posterior_hidden]
        self.user = _Side(
            d * (2 + len(user_post)),
            d * len(user_prior),
            self.latent_dim,
            hidden,
            int(prototypes),
            float(prototype_init_std),
        )
        self.item = _Side(
            d * (2 + len(item_side)),
            d * len(item_side),
            self.latent_dim,
            hidden,
            int(prototypes),
            float(prototype_init_std),
        )

    # -- warm-up
    def set_epoch(self, epoch: int) -> None:
        """β ramps linearly: epoch e (1-based) uses β·min(1, e / kl_warmup_epochs)."""
        self.beta_scale = 1.0 if self.kl_warmup_epochs == 0 else min(1.0, epoch / self.kl_warmup_epochs)

    @property
    def current_beta(self) -> float:
        return self.beta * self.beta_scale

    # -- pieces
    def _fields(self, batch: dict[str, torch.Tensor], fields: list[FieldSpec]) -> list[torch.Tensor]:
        return [self.embedding.embed_field(batch, f) for f in fields]

    def _id(self, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return self.embedding.table(name)(batch[name])

    def posteriors(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"user": (μ, log σ²), "item": (μ, log σ²)}, each [B, latent_dim]."""
        e_s = self._id(batch, self.scenario_field)
        u_in = torch.cat([self._id(batch, self.user_key), e_s, *self._fields(batch, self.user_post_fields)], dim=1)
        i_in = torch.cat([self._id(batch, self.item_key), e_s, *self._fields(batch, self.item_side_fields)], dim=1)
        out = {}
        for side, x in (("user", u_in), ("item", i_in)):
            mu, logvar = getattr(self, side).posterior(x).chunk(2, dim=-1)
            out[side] = (mu, logvar.clamp(*self.logvar_range))
        return out

    def prior_logits(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """log π per side, [B, K]: softmax over prototypes of cos(W g, c_k)/τ; uniform when g is empty."""
        out = {}
        for side, fields in (("user", self.user_prior_fields), ("item", self.item_side_fields)):
            module: _Side = getattr(self, side)
            if module.key is None:
                b = len(batch[self.item_key])
                out[side] = torch.full((b, len(module.prototypes)), -math.log(len(module.prototypes)))
                continue
            key = module.key(torch.cat(self._fields(batch, fields), dim=1))
            sim = nn.functional.normalize(key, dim=-1, eps=1e-8) @ nn.functional.normalize(module.prototypes, dim=-1).T
            out[side] = torch.log_softmax(sim / self.temperature, dim=-1)
        return out

    def prior_probs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """π per side ([B, K], rows sum to one)."""
        return {k: v.exp() for k, v in self.prior_logits(batch).items()}

    def kl_divergence(
        self,
        side: str,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        log_pi: torch.Tensor | None,
        samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-row KL(q ‖ p) for one side, by the configured prior and estimator ([S, B, D] samples for `mc`)."""
        if self.prior == "standard":
            return gaussian_kl(mu, logvar, torch.zeros_like(mu), torch.ones_like(mu))
        centres = getattr(self, side).prototypes
        if self.kl_kind == "moment":
            mean, var = mixture_moments(log_pi.exp(), centres, self.prior_std)
            return gaussian_kl(mu, logvar, mean, var)
        if samples is None:
            samples = self._sample(mu, logvar, self.mc_samples)
        return mc_mixture_kl(samples, mu, logvar, log_pi, centres, self.prior_std)

    @staticmethod
    def _sample(mu: torch.Tensor, logvar: torch.Tensor, n: int) -> torch.Tensor:
        return mu + torch.randn((n, *mu.shape), dtype=mu.dtype, device=mu.device) * (0.5 * logvar).exp()

    # -- interface
    def _run(self, batch: dict[str, torch.Tensor], with_kl: bool) -> dict[str, torch.Tensor]:
        batch = self.backbone.drop_scenarios(batch)  # scenario dropout (training) applies to the posteriors too
        post = self.posteriors(batch)
        sample = self.training or with_kl
        draws = {s: self._sample(mu, lv, self.mc_samples) if sample else None for s, (mu, lv) in post.items()}
        z = {s: draws[s][0] if self.training else post[s][0] for s in post}
        out = {"logits": self.backbone.score(batch, torch.cat([z["user"], z["item"]], dim=1))}
        if with_kl:
            log_pi = self.prior_logits(batch) if self.prior == "global" else {"user": None, "item": None}
            for s, (mu, lv) in post.items():
                out[f"kl_{s}"] = self.kl_divergence(s, mu, lv, log_pi[s], draws[s]).mean()
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._run(batch, with_kl=False)["logits"]

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self._run(batch, with_kl=True)
        bce = nn.functional.binary_cross_entropy_with_logits(out["logits"], batch["label"])
        beta = torch.tensor(self.current_beta)
        total = bce + beta * (out["kl_user"] + out["kl_item"])
        return {"loss": total, "bce": bce, "kl_user": out["kl_user"], "kl_item": out["kl_item"], "beta": beta}


def _default_fields(spec: Any, entity: Entity, key: str) -> list[str]:
    return [f.name for f in spec.of_entity(entity) if f.name != key]


def _default_user_prior(spec: Any) -> list[str]:
    """The user's cross-scenario behaviour: its sequence fields; without any, its other user fields."""
    seqs = [f.name for f in spec.of_entity(Entity.USER) if f.kind is FieldKind.SEQUENCE]
    return seqs or _default_fields(spec, Entity.USER, spec.user_key)
