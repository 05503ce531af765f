"""The retriever's projection initialized from the corpus (model.proj_init=pca): inner products of the projected
vectors are the (scaled) cosines of the pooled ones, so a pre-trained encoder keeps its embedding space."""
import pytest
import torch
import torch.nn.functional as F

from cluster.config import load_config
from core.errors import InputError
from trainer.bert import bert_factory, init_bert
from trainer.checkpoint import load_model, save_model
from trainer.ict import ict
from trainer.model import Retriever, Tower, build_realm, pca_projection
from trainer.model_init import fresh_model, pooled_sample
from trainer.prepare import prepare
from trainer.run import Run


def low_rank(n: int, hidden: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of varying norm in a fixed `rank`-dimensional subspace, plus a second sample from it."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(hidden, rank, generator=g, dtype=torch.float64))[0].T  # [rank, hidden]
    coef = torch.randn(2 * n, rank, generator=g, dtype=torch.float64) * torch.rand(2 * n, 1, generator=g) * 5
    x = (coef @ basis + 3 * basis[0]).float()  # uncentered: a common direction, as sentence embeddings have
    return x[:n], x[n:]


def gram_error(w: torch.Tensor, x: torch.Tensor, scale: float) -> float:
    u = F.normalize(x.double(), dim=-1)
    p = u @ w.double().T
    return float((p @ p.T / scale ** 2 - u @ u.T).abs().max())


@pytest.mark.parametrize("dim", [8, 16])
def test_pca_keeps_the_inner_products_of_normalized_low_rank_data(dim):
    fit, held_out = low_rank(200, hidden=48, rank=8, seed=0)
    w = pca_projection(fit, dim, scale=3.0)
    assert w.shape == (dim, 48)
    assert gram_error(w, fit, 3.0) < 1e-5
    assert gram_error(w, held_out, 3.0) < 1e-5  # the whole subspace, not only the sample it was fitted on
    if dim == 8:  # exactly the subspace's directions, orthonormal (times the scale)
        assert torch.allclose(w @ w.T, 9 * torch.eye(8), atol=1e-4)
    else:  # rows past the data's rank add nothing
        assert float((w.double() @ F.normalize(fit.double(), dim=-1).T)[8:].abs().max()) < 1e-5


def test_pca_loses_what_it_drops_and_a_random_projection_keeps_nothing():
    fit, _ = low_rank(200, hidden=48, rank=12, seed=1)
    assert gram_error(pca_projection(fit, 12), fit, 1.0) < 1e-5
    assert gram_error(pca_projection(fit, 4), fit, 1.0) > 0.05  # 4 of 12 directions: no longer the cosine
    torch.manual_seed(0)
    random = torch.nn.Linear(48, 12).weight.detach()
    assert gram_error(random, fit, 1.0) > 0.3
    assert gram_error(pca_projection(fit, 64), fit, 1.0) < 1e-5  # dim > hidden: zero rows past 48
    assert pca_projection(fit, 64)[48:].abs().max() == 0


def test_a_tower_with_l2_pooling_and_a_pca_projection_scores_by_cosine():
    torch.manual_seed(0)
    bert = init_bert("random", 30522, 1, hidden_size=32, num_heads=2, intermediate_size=64).eval()
    retriever = Retriever(bert, bert, dim=32, pooling="mean_l2").eval()
    ids = torch.randint(1000, 2000, (40, 12))
    mask = torch.ones_like(ids)
    mask[20:, 8:] = 0
    with torch.no_grad():
        raw = Tower(bert, 32, "mean").pooled(ids, mask)
        retriever.set_projection(pca_projection(raw, 32, scale=20 ** 0.5))
        q, d = retriever.embed_queries(ids[:10], mask[:10]), retriever.embed_docs(ids, mask)
    assert torch.equal(retriever.query_tower.proj.weight, retriever.doc_tower.proj.weight)
    assert float(retriever.doc_tower.proj.bias.detach().abs().max()) == 0
    cosine = F.normalize(raw[:10], dim=-1) @ F.normalize(raw, dim=-1).T
    assert torch.allclose(q @ d.T, 20 * cosine, atol=1e-3)
    assert not torch.allclose(raw[:10] @ raw.T, 20 * cosine, atol=1)  # without the normalization: not the cosine


def test_l2_pooling_survives_a_checkpoint_and_bad_poolings_are_refused(tmp_path):
    model = build_realm(bert_factory("random", 30522, 32, 2, 64), 1, 1, 16, pooling="mean_l2")
    save_model(model, tmp_path / "m", step=0)
    loaded, meta = load_model(tmp_path / "m")
    assert meta["pooling"] == "mean_l2" and loaded.retriever.doc_tower.pooling == "mean_l2"
    with pytest.raises(InputError, match="config key 'model.pooling': expected one of cls, mean, cls_l2, mean_l2"):
        load_config(None, ["model.pooling=max"])
    with pytest.raises(InputError, match="config key 'model.proj_init': expected one of random, pca"):
        load_config(None, ["model.proj_init=svd"])
    with pytest.raises(InputError, match="unknown config key 'model.proj_init_dims'"):
        load_config(None, ["model.proj_init_dims=3"])
    assert load_config(None).model.proj_init == "random"  # the default stays as it was


def test_ict_starts_from_the_pca_projection(tiny_cfg):
    cfg = tiny_cfg("model.proj_init=pca", "model.pooling=mean_l2", "model.proj_init_blocks=30",
                   "model.retrieval_dim=32", "ict.steps=0")
    prepare(cfg)
    run = Run.open(cfg)
    ict(cfg)
    model, _ = load_model(f"{cfg.run_dir}/models/ict")
    torch.manual_seed(0)
    fresh = fresh_model(cfg, run.vocab.size)
    pooled = pooled_sample(run, fresh.retriever.doc_tower, 30)
    assert pooled.shape == (30, 32)
    expected = pca_projection(pooled, 32, cfg.model.proj_init_scale ** 0.5)
    for tower in (model.retriever.query_tower, model.retriever.doc_tower):
        assert torch.allclose(tower.proj.weight.T @ tower.proj.weight, expected.T @ expected, atol=1e-3)
        assert float(tower.proj.bias.detach().abs().max()) == 0
