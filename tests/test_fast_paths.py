"""The training fast paths compute what the code they replaced computed (issue 12, point 4).

Each speed-up swapped an implementation for a faster one of the same function:
- `FieldEmbedding.forward`: one `F.embedding` over the dense tables concatenated, instead of one lookup per field;
- `SelfAttention`: `F.scaled_dot_product_attention` instead of softmax(QK^T/sqrt(d)) V written out;
- `TargetAttention` (softmax): empty rows multiplied by 0 instead of `nan_to_num` after a softmax over -inf;
- DGenCTR: the unknown-id mask in one comparison, 1/tau applied to the queries before the cosine matmul;
- the trainer gathers a batch with `index_select` instead of `v[idx]`;
- DGenCTR's Transformer draws its dropout masks with `FastDropout` (numpy PCG64) instead of torch's `bernoulli_`: the
  same operation with another random stream, so it is tested for its distribution, not against the old masks.

The replaced implementations are kept below, verbatim, as the reference: every model is built twice from the same
seed, once as it is and once with the references patched in, and the two must give the same losses, gradients
and scores on the same rows (training mode included: the dropout masks are drawn from the same seed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctrflow.config import load_params
from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind
from ctrflow.data.splits import make_split
from ctrflow.models import build_model, to_tensors
from ctrflow.models.blocks.attention import SelfAttention, TargetAttention
from ctrflow.models.blocks.embedding import FieldEmbedding
from ctrflow.models.dgenctr import LARGE, SMALL, DGenCTR
from ctrflow.training.trainer import gather_rows, seed_everything

torch.set_num_threads(1)


# ---- the replaced implementations (the reference) -------------------------------------------------------------
def reference_embedding_forward(self, batch, exclude=()):
    return torch.stack([self.embed_field(batch, f) for f in self.field_specs if f.name not in exclude], dim=1)


def reference_self_attention(self, x, mask):
    b, n, d = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, L, d/H]
    scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    att = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return self.out((att @ v).transpose(1, 2).reshape(b, n, d)) * mask.unsqueeze(-1).to(x.dtype)


def reference_target_weights(self, query, keys, mask):
    q = query.unsqueeze(1).expand_as(keys)
    scores = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
    if self.softmax:
        scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.softmax(scores, dim=-1)
        return torch.nan_to_num(w, nan=0.0)
    return scores * mask.to(scores.dtype)


def reference_unknown(self, batch):
    first = batch[self.token_names[0]]
    out = torch.zeros(len(first), self.n_tokens, dtype=torch.bool, device=first.device)
    if self.unknown_as_mask:
        for pos, kind in enumerate(self.kinds):
            if kind in (SMALL, LARGE):
                out[:, pos] = batch[self.token_names[pos]] == 0
    return out


def reference_cosine_logits(self, g, cand):
    return F.normalize(g, dim=-1) @ F.normalize(cand, dim=-1).t() / self.tau


REFERENCES = [
    (FieldEmbedding, "forward", reference_embedding_forward),
    (SelfAttention, "forward", reference_self_attention),
    (TargetAttention, "weights", reference_target_weights),
    (DGenCTR, "unknown", reference_unknown),
    (DGenCTR, "_cosine_logits", reference_cosine_logits),
]


# ---- data and models --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_frame, tiny_dataset):
    frame = tiny_frame.copy()
    train = frame[make_split(frame, "temporal").to_numpy() == "train"].reset_index(drop=True)
    encoder = FeatureEncoder(tiny_dataset.spec).fit(train)
    tensors = to_tensors(encoder.transform(train))
    tensors["label"] = tensors["label"].float()
    return encoder, tensors


def _params(name: str, sparse: bool) -> tuple[str, dict]:
    params = load_params()
    if name.startswith("gsvr-"):
        from ctrflow.training.recipe import model_params

        return "gsvr", {**model_params(params, "gsvr", name[5:]), "embedding_dim": 8}
    section = dict(params["models"].get(name) or {})
    if name == "dgenctr":
        return name, {k: v for k, v in section.items() if k not in ("pretrain", "finetune")}
    return name, {**section, "embedding_dim": 8, "sparse": sparse}


def _run(encoder, tensors, name: str, sparse: bool, pretrain: bool = False) -> dict:
    """Losses, gradients (train mode, seeded) and eval-mode scores of a freshly seeded model on the first rows."""
    model_name, params = _params(name, sparse)
    seed_everything(0)
    model = build_model(model_name, encoder, params)
    model.prepare(tensors)
    rows = torch.arange(300)
    batch = gather_rows(tensors, rows)
    model.train()
    torch.manual_seed(1)
    if pretrain:
        losses = model.diffusion_loss(batch, generator=torch.Generator().manual_seed(3))
    else:
        losses = model.loss(batch)
    losses["loss"].backward()
    grads = {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        scores = model(batch)
    return {"losses": {k: v.detach() for k, v in losses.items()}, "grads": grads, "scores": scores, "model": model}


def _both(encoder, tensors, name, sparse, monkeypatch, pretrain=False):
    new = _run(encoder, tensors, name, sparse, pretrain)
    with monkeypatch.context() as m:
        for cls, attr, fn in REFERENCES:
            m.setattr(cls, attr, fn)
        old = _run(encoder, tensors, name, sparse, pretrain)
    return new, old


def _assert_same(new, old):
    assert new["losses"].keys() == old["losses"].keys()
    for k in new["losses"]:
        torch.testing.assert_close(new["losses"][k], old["losses"][k], rtol=1e-5, atol=1e-6, msg=f"loss part {k}")
    torch.testing.assert_close(new["scores"], old["scores"], rtol=1e-5, atol=1e-5)
    assert new["grads"].keys() == old["grads"].keys()
    for k in new["grads"]:
        torch.testing.assert_close(new["grads"][k], old["grads"][k], rtol=1e-4, atol=1e-6, msg=f"gradient of {k}")


MODELS = [
    ("lr", False), ("deepfm", False), ("deepfm", True), ("dcnv2", False), ("dcnv2", True), ("din", False),
    ("din", True), ("dmae", False), ("early_fusion", False), ("simtier", False), ("sharedbottom", False),
    ("mmoe", False), ("ple", False), ("star", False), ("gsvr-star", False), ("gsvr-mmoe", False), ("dgenctr", False),
]  # fmt: skip


@pytest.mark.parametrize("name,sparse", MODELS)
def test_every_model_computes_what_the_replaced_code_computed(setup, name, sparse, monkeypatch):
    encoder, tensors = setup
    new, old = _both(encoder, tensors, name, sparse, monkeypatch)
    _assert_same(new, old)


def test_dgenctr_pretraining_loss_and_gradients_are_unchanged(setup, monkeypatch):
    encoder, tensors = setup
    new, old = _both(encoder, tensors, "dgenctr", False, monkeypatch, pretrain=True)
    assert float(new["losses"]["masked"]) > 0
    _assert_same(new, old)


def test_the_fused_lookup_is_the_path_taken_and_skips_sparse_tables(setup):
    encoder, _ = setup
    dense = FieldEmbedding(encoder, 4)
    names, owners, rest, _ = dense._plan(())
    singles = [f.name for f in dense.field_specs if f.kind in (FieldKind.CATEGORICAL, FieldKind.NUMERIC)]
    assert names == singles and len(names) >= 2
    assert {f.kind for f in rest} <= {FieldKind.SEQUENCE, FieldKind.EMBEDDING}
    sparse = FieldEmbedding(encoder, 4, sparse=True)
    names, owners, rest, _ = sparse._plan(())
    large = {f.name for f in sparse.field_specs if f.large}
    assert large and not large & set(names) and large <= {f.name for f in rest}
    assert all(not sparse.tables[o].sparse for o in owners)


def test_padding_rows_stay_zero_and_get_no_gradient(setup):
    encoder, tensors = setup
    emb = FieldEmbedding(encoder, 4)
    batch = gather_rows(tensors, torch.arange(64))
    batch["user_id"] = batch["user_id"].clone()
    batch["user_id"][:5] = 0  # unknown users
    out = emb(batch)
    pos = emb.field_names.index("user_id")
    assert torch.equal(out[:5, pos], torch.zeros(5, 4))
    out.sum().backward()
    for name, table in emb.tables.items():
        assert torch.equal(table.weight.grad[0], torch.zeros(4)), name


def test_an_id_outside_its_table_is_an_error_naming_the_field(setup):
    encoder, tensors = setup
    emb = FieldEmbedding(encoder, 4)
    batch = gather_rows(tensors, torch.arange(8))
    batch["scenario"] = batch["scenario"].clone()
    batch["scenario"][2] = encoder.vocab_size("scenario")  # one past the end: would land in the next table
    with pytest.raises(IndexError, match="field 'scenario': 1 ids outside its table"):
        emb(batch)


def test_self_attention_rows_without_behaviour_are_zero_with_zero_gradient():
    torch.manual_seed(0)
    att = SelfAttention(8, 2)
    x = torch.randn(4, 5, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = att(x, mask)
    torch.testing.assert_close(out, reference_self_attention(att, x, mask), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1], torch.zeros(5, 8)) and torch.equal(out[0, 2:], torch.zeros(3, 8))
    out.sum().backward()
    assert torch.equal(x.grad[1], torch.zeros(5, 8))


def test_gather_rows_equals_advanced_indexing(setup):
    _, tensors = setup
    idx = torch.randperm(len(tensors["label"]), generator=torch.Generator().manual_seed(0))[:100]
    got = gather_rows(tensors, idx)
    for k, v in tensors.items():
        assert torch.equal(got[k], v[idx]), k


# ---- FastDropout: the same dropout as nn.Dropout, a faster random stream ---------------------------------------
def test_fast_dropout_keeps_each_element_with_probability_1_minus_p_and_scales_like_nn_dropout():
    from ctrflow.models.blocks.dropout import LEVELS, FastDropout

    drop = FastDropout(0.1).train()
    assert drop.threshold == 58982 and abs(drop.threshold / LEVELS - 0.9) < 2**-17
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    # 10^6 Bernoulli(0.9) draws: the kept share is within 5 standard deviations (5 * 0.0003) of 0.9
    assert abs(kept.float().mean().item() - 0.9) < 5 * (0.9 * 0.1 / 1e6) ** 0.5
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))  # inverted dropout: E[y] = x
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask times the same scale
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # torch's seed reproduces the mask
    assert not torch.equal(drop(x), y)  # and the next call draws a new one
    x2 = torch.randn(64, 8)
    assert torch.equal(drop.eval()(x2), x2) and torch.equal(FastDropout(0.0).train()(x2), x2)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        FastDropout(1.0)


def test_fast_dropout_drops_rows_and_columns_independently():
    """No structure in the mask: the kept share per row and per column of a 2000 x 2000 draw stays near 0.9, and
    two halves of the stream are uncorrelated."""
    from ctrflow.models.blocks.dropout import FastDropout

    torch.manual_seed(1)
    kept = FastDropout(0.1).train().keep_mask(torch.Size([2000, 2000])).float()
    sd = (0.9 * 0.1 / 2000) ** 0.5
    assert (kept.mean(dim=0) - 0.9).abs().max() < 6 * sd and (kept.mean(dim=1) - 0.9).abs().max() < 6 * sd
    a, b = kept[:1000].flatten() - 0.9, kept[1000:].flatten() - 0.9
    assert abs((a * b).mean().item()) / 0.09 < 0.01


def test_dgenctr_draws_its_transformer_dropout_with_fast_dropout(setup):
    from ctrflow.models.blocks.dropout import FastDropout

    encoder, _ = setup
    model = build_model("dgenctr", encoder, {"embedding_dim": 8, "layers": 2})
    dropouts = [m for m in model.denoiser.modules() if isinstance(m, torch.nn.Dropout | FastDropout)]
    assert len(dropouts) == 8 and all(type(m) is FastDropout and m.p == 0.1 for m in dropouts)  # 4 per layer


def test_dgenctr_denoiser_layer_computes_torchs_encoder_layer():
    """The written-out self-attention (training mode, so its attention dropout can be a FastDropout) gives torch's
    layer's output and gradients with dropout off; in eval mode it is torch's code path itself (exactly equal)."""
    from ctrflow.models.dgenctr import DenoiserLayer

    torch.manual_seed(0)
    ours = DenoiserLayer(32, 4, 128, 0.0, activation="gelu", batch_first=True, norm_first=True)
    torchs = torch.nn.TransformerEncoderLayer(32, 4, 128, 0.0, activation="gelu", batch_first=True, norm_first=True)
    torchs.load_state_dict(ours.state_dict())
    x = torch.randn(16, 9, 32)
    out, ref = ours.train()(x), torchs.train()(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), torchs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4, msg=name)  # gradients of size 30-80
    assert torch.equal(ours.eval()(x), torchs.eval()(x))
