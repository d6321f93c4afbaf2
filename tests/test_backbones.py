"""Multi-scenario backbones (SharedBottom, MMoE, PLE, STAR): shapes, a training step, the shared slot for unknown
scenarios, the scenario checks at training, the sparse-scenario protocol and pre-trained embedding init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import build_model, to_tensors
from ctrflow.models.blocks.embedding import load_embedding_init
from ctrflow.models.blocks.scenario import (
    UnseenScenarioError,
    check_scenarios,
    downsample_scenario,
    scenario_counts,
)
from ctrflow.models.star import PartitionedNorm, StarLinear
from ctrflow.training import TrainConfig, Trainer, seed_everything
from ctrflow.training.artifact import Scorer, load_model_artifact, save_model_artifact

torch.set_num_threads(1)
BACKBONES = ("sharedbottom", "mmoe", "ple", "star")
SMALL = {
    "sharedbottom": {"bottom": [32, 16], "tower": [8]},
    "mmoe": {"experts": 3, "expert": [32, 16], "tower": [8]},
    "ple": {"levels": 2, "shared_experts": 2, "specific_experts": 1, "expert": [16], "tower": [8]},
    "star": {"hidden": [32, 16], "aux": [8]},
}


@pytest.fixture(scope="module")
def encoder(tiny_dataset, tiny_frame) -> FeatureEncoder:
    return FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:4000])


@pytest.fixture(scope="module")
def train(encoder, tiny_frame) -> dict[str, torch.Tensor]:
    return to_tensors(encoder.transform(tiny_frame.iloc[:4000]))


@pytest.fixture(scope="module")
def batch(encoder, tiny_frame) -> dict[str, torch.Tensor]:
    return to_tensors(encoder.transform(tiny_frame.iloc[4000:4300]))


def _model(name: str, encoder: FeatureEncoder, **extra: object):
    seed_everything(0)
    return build_model(name, encoder, {"embedding_dim": 4, **SMALL[name], **extra})


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_shape_and_eval_determinism(name, encoder, batch) -> None:
    model = _model(name, encoder).eval()
    out = model(batch)
    assert out.shape == (300,) and torch.isfinite(out).all()
    assert torch.equal(out, model(batch))  # eval mode: no dropout, no scenario dropout
    assert model.num_slots == len(encoder.vocabs["scenario"]) + 1


@pytest.mark.parametrize("name", BACKBONES)
def test_trains_a_step_with_the_standard_trainer(name, encoder, train, batch) -> None:
    model = _model(name, encoder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    part = {k: v[:1024] for k, v in train.items()}
    result = Trainer(model, TrainConfig(epochs=1, batch_size=256, progress=False, threads=1)).fit(part, batch)
    assert result.epochs == 1 and np.isfinite(result.history[0]["train_loss"])
    assert result.history[0]["valid_auc"] is not None
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("embedding.") for k in changed) and len(changed) > 5


@pytest.mark.parametrize("name", BACKBONES)
def test_unknown_scenario_uses_only_the_shared_parameters(name, encoder, batch) -> None:
    """Rows with scenario id 0 (never seen in training) never touch a known scenario's own parameters."""
    model = _model(name, encoder).eval()
    unknown = {**batch, "scenario": torch.zeros_like(batch["scenario"])}
    model(unknown).sum().backward()
    for slot in range(1, model.num_slots):
        for param, index in model.slot_parameters(slot):
            grad = param.grad if index is None or param.grad is None else param.grad[index]
            assert grad is None or torch.count_nonzero(grad) == 0, f"{name}: slot {slot} got a gradient"
    model.zero_grad()
    # ...while a known scenario's rows do use their own parameters
    model(batch).sum().backward()
    assert any(
        p.grad is not None and torch.count_nonzero(p.grad if i is None else p.grad[i]) > 0
        for p, i in model.slot_parameters(1)
    )


@pytest.mark.parametrize("name", BACKBONES)
def test_scenario_dropout_trains_the_shared_slot(name, encoder, batch) -> None:
    model = _model(name, encoder, scenario_dropout=0.5).train()
    dropped = model.drop_scenarios(batch)["scenario"]
    assert 0 < int((dropped == 0).sum()) < len(dropped)
    model.loss(batch)["loss"].backward()
    own = model.slot_parameters(0)
    if name == "star":
        assert own == []  # STAR's unknown scenario is the centre itself, trained by every row
    else:
        assert any(p.grad is not None and torch.count_nonzero(p.grad if i is None else p.grad[i]) > 0 for p, i in own)
    assert torch.equal(model.eval().drop_scenarios(batch)["scenario"], batch["scenario"])  # never at inference


@pytest.mark.parametrize("name", BACKBONES)
def test_serving_an_unseen_scenario_falls_back_and_round_trips(name, encoder, tiny_frame, tmp_path) -> None:
    model = _model(name, encoder)
    save_model_artifact(tmp_path, model, encoder, {}, {"model": name})
    scorer = Scorer.from_directory(tmp_path)
    rows = tiny_frame.iloc[4000:4100].copy()
    known = scorer.score(rows)
    assert np.allclose(known, Scorer(model.eval(), encoder).score(rows))  # the artifact reloads the same model
    rows["scenario"] = "a-scenario-never-seen"
    unseen = scorer.score(rows)
    assert np.isfinite(unseen).all()
    ids = to_tensors(encoder.transform(rows, with_label=False))
    assert int(ids["scenario"].max()) == 0  # encoded as unknown...
    assert not np.allclose(unseen, known)  # ...and scored by the shared path, not a known scenario's
    assert load_model_artifact(tmp_path).model.num_slots == model.num_slots


def test_undeclared_scenario_in_training_data_is_an_error(tiny_dataset, tiny_frame) -> None:
    frame = tiny_frame.iloc[:2000].copy()
    frame.loc[frame.index[:37], "scenario"] = "mars"
    enc = FeatureEncoder(tiny_dataset.spec).fit(frame)
    with pytest.raises(UnseenScenarioError, match="'mars'.*does not declare"):
        build_model("star", enc, {"embedding_dim": 4})
    ids = to_tensors(enc.transform(frame))["scenario"]
    with pytest.raises(UnseenScenarioError, match=r"'mars' \(37 rows\)"):
        check_scenarios(tiny_dataset.spec, scenario_counts(enc, ids))


def test_train_split_missing_a_declared_scenario_is_an_error(tiny_dataset, tiny_frame) -> None:
    frame = tiny_frame[tiny_frame["scenario"] != "live"].iloc[:2000]
    enc = FeatureEncoder(tiny_dataset.spec).fit(frame)
    with pytest.raises(UnseenScenarioError, match=r"'live' \(0 rows\)"):
        build_model("mmoe", enc, {"embedding_dim": 4})
    # modelling only the scenarios present is fine; asking for one the spec lacks is not
    assert build_model("mmoe", enc, {"embedding_dim": 4, "scenarios": ["home", "search", "cart"]}).num_slots == 4
    with pytest.raises(UnseenScenarioError, match="'moon'"):
        build_model("mmoe", enc, {"embedding_dim": 4, "scenarios": ["home", "moon"]})


def test_partitioned_norm_uses_each_scenarios_statistics() -> None:
    torch.manual_seed(0)
    norm = PartitionedNorm(slots=3, dim=4, min_rows=4)
    s = torch.tensor([1] * 50 + [2] * 50)
    x = torch.randn(100, 4) + torch.where(s == 1, 5.0, -3.0).unsqueeze(-1)
    y = norm.train()(x, s)
    for k in (1, 2):
        assert torch.allclose(y[s == k].mean(0), torch.zeros(4), atol=1e-5)
        assert torch.allclose(norm.running_mean[k], 0.1 * x[s == k].mean(0), atol=1e-5)
    # at serving, a slot's own moving statistics; an unknown slot uses the global ones
    y_eval = norm.eval()(x[:3], torch.tensor([1, 0, 2]))
    assert torch.allclose(y_eval[1], (x[1] - norm.running_mean[0]) / torch.sqrt(norm.running_var[0] + norm.eps))


def test_star_linear_centre_and_scenario_weights() -> None:
    torch.manual_seed(0)
    layer = StarLinear(slots=3, in_dim=5, out_dim=2)
    with torch.no_grad():
        layer.slot_weight[2].uniform_(0.5, 1.5)
        layer.slot_bias[2].fill_(0.3)
    x = torch.randn(4, 5)
    out = layer(x, torch.tensor([0, 1, 2, 0]))
    assert torch.allclose(out[0], x[0] @ layer.weight + layer.bias)  # unknown: the centre alone
    assert torch.allclose(out[1], x[1] @ layer.weight + layer.bias)  # W_s' starts at ones
    assert torch.allclose(out[2], x[2] @ (layer.weight * layer.slot_weight[2]) + layer.bias + 0.3)


def test_downsample_scenario_is_seeded_and_touches_one_scenario(encoder, train) -> None:
    home = encoder.vocabs["scenario"].index("home") + 1
    small = downsample_scenario(train, encoder, "home", keep=0.1, seed=3)
    n_home = int((train["scenario"] == home).sum())
    assert int((small["scenario"] == home).sum()) == round(0.1 * n_home)
    for k in range(1, len(encoder.vocabs["scenario"]) + 1):
        if k != home:
            assert int((small["scenario"] == k).sum()) == int((train["scenario"] == k).sum())
    again = downsample_scenario(train, encoder, "home", keep=0.1, seed=3)
    assert all(torch.equal(small[k], again[k]) for k in small)
    with pytest.raises(UnseenScenarioError, match="'mars'"):
        downsample_scenario(train, encoder, "mars")


def test_load_embedding_init_copies_tables_by_name_and_shape(encoder, tmp_path) -> None:
    seed_everything(1)
    source = build_model("dcnv2", encoder, {"embedding_dim": 4, "cross_layers": 1, "mlp": [8]})
    with torch.no_grad():
        source.embedding.table("item_id").weight.normal_()
    torch.save(source.state_dict(), tmp_path / "pretrained.pt")
    target = _model("star", encoder)
    report = load_embedding_init(target, tmp_path / "pretrained.pt")
    assert "embedding.tables.item_id" in report["copied"]
    got, want = target.embedding.table("item_id").weight, source.embedding.table("item_id").weight
    assert torch.equal(got[1:], want[1:]) and torch.equal(got[0], torch.zeros(4))
    wrong = _model("star", encoder, embedding_dim=8)  # other shapes: nothing to copy
    with pytest.raises(ValueError, match="no FieldEmbedding table matched"):
        load_embedding_init(wrong, tmp_path / "pretrained.pt")
