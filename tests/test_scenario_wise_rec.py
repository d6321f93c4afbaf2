"""The Scenario-Wise Rec ML-1M protocol on tiny synthetic RecBole files (never ML-1M itself): its fields, the age
scaling, the 8:1:1 random split, the models' inputs, and the StepLR schedule of the one trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.suites.scenario_wise_rec import COMMON, FIELDS, SIZES, TRAIN
from ctrflow.data.frames import point_in_time_frame
from ctrflow.data.movielens_1m import load_movielens_1m_swr
from ctrflow.data.splits import make_split
from ctrflow.models import build_model
from ctrflow.training.recipe import SplitData
from ctrflow.training.trainer import TrainConfig, Trainer

# (user, age code, gender, occupation, zip): one user per age group edge
USERS = [(1, 1, "F", 10, "48067"), (2, 56, "M", 16, "70072"), (3, 25, "M", 15, "55117"), (4, 18, "F", 7, "02460-1234"), (5, 35, "M", 20, "A1B2C")]
ITEMS = [("Alpha (1990)", "Alpha", 1990, "Drama Comedy"), ("Beta (1995)", "Beta", 1995, "Action"), ("Gamma (2000)", "Gamma", 2000, "Comedy Drama")]


@pytest.fixture
def ml1m_dir(tmp_path):
    (tmp_path / "ml-1m.user").write_text(
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        + "".join(f"1m_{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in USERS)
    )
    (tmp_path / "ml-1m.item").write_text(
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        + "".join(f"{i}\t{t}\t{y}\t{g}\n" for i, t, y, g in ITEMS)
    )
    rows = [(u, ITEMS[(u + k) % 3][0], 1 + (u * 7 + k) % 5, 978300000 + 60 * k + u) for u, *_ in USERS for k in range(40)]
    (tmp_path / "ml-1m.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"1m_{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    )
    return tmp_path


def test_published_fields_age_zip_and_scenarios(ml1m_dir):
    ds = load_movielens_1m_swr(ml1m_dir)
    assert ds.name == "ml-1m-swr"
    assert ds.spec.names == ["user_id", "item_id", "scenario", "gender", "occupation", "zip", "first_genre", "age"]
    users = ds.users.set_index("user_id")
    # MinMax over the age codes 1..56, by hand: (age - 1) / 55
    assert [float(users.loc[u, "age"][0]) for u in (1, 2, 3, 4, 5)] == pytest.approx([0.0, 1.0, 24 / 55, 17 / 55, 34 / 55])
    assert users.loc[4, "zip"] == "02460-1234" and users.loc[5, "zip"] == "A1B2C"  # the whole code, as the script
    by_user = ds.interactions.groupby("user_id")["scenario"].first().to_dict()
    assert by_user == {1: "<25", 2: ">=35", 3: "25-34", 4: "<25", 5: ">=35"}
    assert ds.items.set_index("item_id")["first_genre"].tolist() == ["Drama", "Action", "Comedy"]
    assert ds.interactions["label"].sum() == sum(1 for u, *_ in USERS for k in range(40) if 1 + (u * 7 + k) % 5 > 3)


def test_random_split_and_encoded_inputs(ml1m_dir):
    ds = load_movielens_1m_swr(ml1m_dir)
    frame = point_in_time_frame(ds)
    frame["split"] = make_split(frame, "random", seed=0).to_numpy()
    assert frame["split"].value_counts().to_dict() == {"train": 160, "valid": 20, "test": 20}  # 8:1:1 of 200
    data = SplitData.from_frame(frame, ds.spec, where="test")
    train = data.tensors["train"]
    assert set(train) == {*ds.spec.names, "label"}  # no behaviour sequence, no counts
    assert train["age"].shape == (160, 1) and train["age"].dtype == torch.float32
    assert float(train["age"].min()) >= 0.0 and float(train["age"].max()) <= 1.0
    for name in SIZES:
        model = build_model(name, data.encoder, {**COMMON, **SIZES[name]})
        assert model.embedding.field_names == FIELDS  # the scenario routes, it is not an input feature
        with torch.no_grad():
            out = model.eval()(train)
        assert out.shape[0] == 160 and torch.isfinite(out).all()


def test_step_lr_matches_torch_step_lr():
    cfg = TrainConfig(lr=TRAIN["lr"], lr_step_size=TRAIN["lr_step_size"], lr_gamma=TRAIN["lr_gamma"], progress=False)
    trainer = Trainer(torch.nn.Linear(2, 1), cfg)
    ours = [trainer.epoch_lr(e) for e in range(1, 7)]
    assert ours == pytest.approx([1e-3, 1e-3, 8.5e-4, 8.5e-4, 7.225e-4, 7.225e-4])  # by hand: 1e-3 * 0.85 ** k
    opt = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.85)
    reference = []
    for _ in range(6):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(reference)
    assert Trainer(torch.nn.Linear(2, 1), TrainConfig(lr=0.01, progress=False)).epoch_lr(9) == 0.01  # default: constant
    with pytest.raises(ValueError, match="lr_gamma"):
        TrainConfig(lr_step_size=2, lr_gamma=0.0)
    assert np.isclose(TrainConfig().lr_gamma, 1.0) and TrainConfig().lr_step_size == 0


def test_batch_norm_option_puts_batchnorm_after_each_hidden_linear(ml1m_dir):
    from ctrflow.models.blocks.mlp import MLP, RowSafeBatchNorm

    mlp = MLP(4, [8, 3], out_dim=1, batch_norm=True)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "RowSafeBatchNorm", "ReLU", "Linear", "RowSafeBatchNorm", "ReLU", "Linear"]
    assert [type(m).__name__ for m in MLP(4, [8], out_dim=1).net] == ["Linear", "ReLU", "Linear"]  # default: none
    bn = RowSafeBatchNorm(3).train()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(bn(x), x / (1 + bn.eps) ** 0.5)  # one row: running stats (0, 1), not an error
    ds = load_movielens_1m_swr(ml1m_dir)
    frame = point_in_time_frame(ds)
    frame["split"] = make_split(frame, "random", seed=0).to_numpy()
    data = SplitData.from_frame(frame, ds.spec, where="test")
    for name in ("sharedbottom", "mmoe", "ple"):
        model = build_model(name, data.encoder, {**COMMON, **SIZES[name], "batch_norm": True}).train()
        assert any(isinstance(m, RowSafeBatchNorm) for m in model.modules())
        assert torch.isfinite(model(data.tensors["train"])).all()


def test_quality_md_prints_published_rows_beside_ours():
    from benchmarks.harness import render_markdown

    base = {"dataset": "ml-1m-swr", "protocol": "published", "split": "random", "model": "star", "variant": "published"}
    records = [
        {**base, "seed": s, "auc": a, "gauc": 0.7, "logloss": 0.5, "scenario_auc": {"<25": 0.81, "25-34": 0.81, ">=35": 0.80}, "epochs": 5, "train_seconds": 100}
        for s, a in ((0, 0.8000), (1, 0.8020))
    ]
    other = {**records[0], "variant": "no-batchnorm", "auc": 0.7000}  # another variant: no published row, not averaged
    md = render_markdown([*records, other])
    assert md.count("| star | paper (published) | 3 | 0.8096") == 1
    assert "| star | paper (published) | 3 | 0.8096 | – | – | 0.8133 | 0.8137 | 0.7979 | – | – |" in md  # AUC 25-34, <25, >=35
    assert "- star: -0.0086 (outside ±0.005)" in md  # mean(0.8000, 0.8020) - 0.8096, by hand
