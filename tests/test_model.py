import math

import numpy as np
import pytest
import torch

from trainer.bert import bert_factory
from trainer.data import Example, collate_realm, mask_example
from trainer.model import build_realm, marginal_log_likelihood, span_log_prob


def test_marginal_likelihood_equals_brute_force_sum_with_null_document():
    torch.manual_seed(0)
    B, Z = 3, 4  # 3 retrieved candidates + the null document
    scores = torch.randn(B, Z, dtype=torch.float64)
    span_lp = -torch.rand(B, Z, dtype=torch.float64) * 5
    got = marginal_log_likelihood(scores, span_lp)
    for b in range(B):
        denom = sum(math.exp(s) for s in scores[b].tolist())
        brute = sum(math.exp(scores[b, z].item()) / denom * math.exp(span_lp[b, z].item()) for z in range(Z))
        assert got[b].item() == pytest.approx(math.log(brute), rel=1e-6)


def test_padded_candidates_get_zero_probability():
    scores = torch.tensor([[0.5, 1.0, float("-inf")]])
    span = torch.tensor([[-1.0, -2.0, 0.0]])  # the padded candidate would explain y perfectly
    p0, p1 = torch.softmax(torch.tensor([0.5, 1.0]), 0).tolist()
    expected = math.log(p0 * math.exp(-1.0) + p1 * math.exp(-2.0))
    assert marginal_log_likelihood(scores, span).item() == pytest.approx(expected, rel=1e-6)


def test_span_log_prob_sums_masked_tokens_only():
    lp = torch.log_softmax(torch.randn(2, 3, 7), -1)
    targets = torch.tensor([[1, 2, 3], [4, 5, 0]])
    tmask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = span_log_prob(lp, targets, tmask)
    assert got[0].item() == pytest.approx(sum(lp[0, i, t].item() for i, t in enumerate([1, 2, 3])), rel=1e-6)
    assert got[1].item() == pytest.approx(lp[1, 0, 4].item() + lp[1, 1, 5].item(), rel=1e-6)


@pytest.fixture(scope="module")
def small_realm_batch(tmp_path_factory):
    from indexer.blocks import BlockStore, build_block_store
    from indexer.tokenizer import Vocab, load_tokenizer
    from tests.conftest import write_jsonl

    d = tmp_path_factory.mktemp("m")
    rows = [{"id": f"d{i}", "title": f"Person {i}", "text": f"Person {i} lives in city{i}. It is sunny."}
            for i in range(6)]
    build_block_store(str(write_jsonl(d / "c.jsonl", rows)), d / "blocks", "minilm", 64, 8, 10**6)
    store = BlockStore(d / "blocks")
    tok = load_tokenizer(store.vocab_file)
    vocab = Vocab(tok)
    rng = np.random.default_rng(0)
    qs = [mask_example(Example(text=f"Person {i} resides in Paris.", spans=[[22, 27]], fixed_span=True),
                       tok, vocab, 32, rng, "salient") for i in range(2)]
    cand = np.array([[0, 1, 2], [3, -1, 5]])
    return collate_realm(qs, cand, store, vocab, 64), vocab


def tiny_model(vocab_size):
    torch.manual_seed(0)
    return build_realm(bert_factory("random", vocab_size, 32, 2, 64), 1, 1, 16)


def test_forward_matches_brute_force_per_candidate_computation(small_realm_batch):
    batch, vocab = small_realm_batch
    model = tiny_model(vocab.size).eval()
    out = model(batch)
    B, K, _ = batch.reader_ids.shape
    Z = K + 1
    with torch.no_grad():
        for b in range(B):
            q = model.retriever.embed_queries(batch.query_ids[b:b + 1], batch.query_mask[b:b + 1])[0]
            terms = []
            for z in range(Z):
                if z == 0:
                    score = model.null_score[0]
                elif not batch.cand_valid[b, z - 1]:
                    continue
                else:
                    d = model.retriever.embed_docs(batch.cand_ids[b, z - 1:z], batch.cand_mask[b, z - 1:z])[0]
                    score = q @ d
                if z == 0:  # the null document: the reader sees x alone
                    ids, mask = batch.query_ids[b:b + 1], batch.query_mask[b:b + 1]
                    types = torch.zeros_like(ids)
                else:
                    ids, mask = batch.reader_ids[b, z - 1:z], batch.reader_mask[b, z - 1:z]
                    types = batch.reader_types[b, z - 1:z]
                lp = model.reader.masked_log_probs(ids, mask, types, batch.positions[b:b + 1])[0]
                n = int(batch.target_mask[b].sum())
                span = sum(lp[i, batch.targets[b, i]] for i in range(n))
                terms.append((score, span))
            scores = torch.stack([s for s, _ in terms])
            brute = torch.logsumexp(torch.log_softmax(scores, 0) + torch.stack([s for _, s in terms]), 0)
            assert out["log_likelihood"][b].item() == pytest.approx(brute.item(), abs=1e-4)


def test_gradients_reach_query_encoder_doc_encoder_reader_and_null_score(small_realm_batch):
    batch, vocab = small_realm_batch
    model = tiny_model(vocab.size).train()
    model(batch)["loss"].backward()
    r = model.retriever
    for name, module in [("query", r.query_tower.encoder), ("doc", r.doc_tower.encoder),
                         ("reader", model.reader.bert)]:
        grads = [p.grad for p in module.encoder.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert model.null_score.grad is not None and model.null_score.grad.abs().item() > 0


def test_marginal_token_log_probs_and_span_accuracy_against_brute_force():
    from trainer.model import marginal_token_log_probs, spans_correct
    g = torch.Generator().manual_seed(0)
    scores, token_lp = torch.randn(2, 3, generator=g), torch.randn(2, 3, 2, 5, generator=g).log_softmax(-1)
    got = marginal_token_log_probs(scores, token_lp)
    p_z = scores.softmax(-1)
    for b in range(2):
        for m in range(2):
            want = sum(p_z[b, z] * token_lp[b, z, m].exp() for z in range(3)).log()
            assert torch.allclose(got[b, m], want, atol=1e-5)
    targets = got.argmax(-1)
    targets[1, 1] = (targets[1, 1] + 1) % 5                  # example 1 misses its second position...
    assert spans_correct(got, targets, torch.ones(2, 2)).tolist() == [True, False]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])            # ...which is padding here: then right
    assert spans_correct(got, targets, mask).tolist() == [True, True]


@pytest.mark.parametrize("copy_layer, copy_init", [(0, "random"), (1, "identity"), (2, "identity")])
def test_copy_head_mixes_a_pointer_into_z_with_the_vocabulary_against_brute_force(copy_layer, copy_init):
    """p(w) = g p_vocab(w) + (1 - g) Σ_{i in z, token_i = w} a_i, computed token by token, the pointer and
    the gate over the states after layer `copy_layer` (0 and 2 = the last of 2), p_vocab over the last; without
    z (the null document's input) it is the MLM head's distribution."""
    torch.manual_seed(0)
    reader = build_realm(bert_factory("random", 50, 32, 2, 64), 2, 2, 16, reader_head="copy",
                         copy_layer=copy_layer, copy_init=copy_init).reader.eval()
    if copy_init == "identity":  # the pointer starts as the states' own inner product
        assert torch.equal(reader.copy_head.query.weight, torch.eye(32)) and not reader.copy_head.key.bias.any()
    ids = torch.randint(5, 50, (3, 10))
    ids[0, 6] = ids[0, 8]                      # a word twice in z: its pointer mass adds up
    types = torch.zeros_like(ids)
    types[:2, 5:] = 1                          # rows 0, 1: x = positions 0-4, z = 5-9; row 2: x alone
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                            # padding is never pointed at
    positions = torch.tensor([[1, 2]] * 3)
    got = reader.masked_log_probs(ids, mask, types, positions)
    assert torch.allclose(got.exp().sum(-1), torch.ones(3, 2), atol=1e-5)
    with torch.no_grad():
        states = reader.bert(input_ids=ids, attention_mask=mask, token_type_ids=types,
                             output_hidden_states=True).hidden_states
        h_last, h = states[-1], states[copy_layer or -1]
        assert copy_layer != 1 or not torch.allclose(h, h_last)  # layer 1's states are not the last's
        head = reader.copy_head
        for n in range(3):
            for j, pos in enumerate(positions[n].tolist()):
                p_vocab = torch.softmax(reader.mlm_head(h_last[n, pos]), -1)
                z = [i for i in range(10) if types[n, i] == 1 and mask[n, i] == 1]
                if not z:
                    expected = p_vocab
                else:
                    att = torch.stack([head.query(h[n, pos]) @ head.key(h[n, i]) for i in z]) / 32 ** 0.5
                    p_copy = torch.zeros(50)
                    for a, i in zip(att.softmax(0), z):
                        p_copy[ids[n, i]] += a
                    g = torch.sigmoid(head.gate(h[n, pos]))
                    expected = g * p_vocab + (1 - g) * p_copy
                assert torch.allclose(got[n, j], expected.log(), atol=1e-5), (n, j)
    got[:, :, 7].sum().backward()              # word 7 need not be in z: log(0) must not turn into NaN
    assert all(torch.isfinite(p.grad).all() for p in reader.parameters() if p.grad is not None)


def test_candidates_signal_reorders_the_retrieved_blocks_and_leaves_the_reader_gradient_alone(small_realm_batch):
    """retriever_signal="candidates": the towers' gradient on the candidates' scores sums to zero in each row (it
    reorders them; the paper's marginal moves them all once the null doc wins), the null score gets none of it,
    and the reader and null score get exactly the paper's gradient."""
    batch, vocab = small_realm_batch
    grads, score_grads = {}, {}
    for signal in ("marginal", "candidates"):
        model = tiny_model(vocab.size).train()
        with torch.no_grad():
            model.null_score.fill_(3.0)  # the null doc dominates p(z|x), as it does in a failing run
        out = model(batch, retriever_signal=signal)
        score_grads[signal] = torch.autograd.grad(out["loss"], out["scores"], retain_graph=True)[0]
        out["loss"].backward()
        grads[signal] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    cand = score_grads["candidates"][:, 1:]
    assert torch.allclose(cand.sum(-1), torch.zeros(len(cand)), atol=1e-6)
    assert cand.abs().sum() > 0
    assert score_grads["marginal"][:, 1:].sum(-1).abs().max() > 1e-4  # the paper's: not a reordering
    same = {n: torch.allclose(g, grads["candidates"][n], atol=1e-6) for n, g in grads["marginal"].items()}
    assert all(ok for n, ok in same.items() if not n.startswith("retriever."))
    assert not same["retriever.query_tower.proj.weight"]
    assert not same["retriever.doc_tower.proj.weight"]
    with torch.no_grad():  # no grad: the frozen retriever's loss is the paper's
        frozen = tiny_model(vocab.size).eval()
        assert frozen(batch, retriever_signal="candidates")["loss"] == pytest.approx(frozen(batch)["loss"].item())


def test_without_the_null_document_the_marginal_is_over_top_k_only(small_realm_batch):
    batch, vocab = small_realm_batch
    model = tiny_model(vocab.size).eval()
    with torch.no_grad():
        model.null_score.fill_(3.0)  # a null document that would take most of p(z|x)
        with_null = model(batch)
        model.null_document = False
        without = model(batch)
    assert torch.isfinite(with_null["scores"][:, 0]).all()  # the default keeps it
    assert torch.isinf(without["scores"][:, 0]).all()
    assert torch.equal(with_null["scores"][:, 1:], without["scores"][:, 1:])
    span_lp = without["span_log_probs"]
    expected = torch.logsumexp(without["scores"][:, 1:].log_softmax(-1) + span_lp[:, 1:], -1)
    assert torch.allclose(without["log_likelihood"], expected)
    assert not torch.allclose(with_null["log_likelihood"], expected)


def test_a_row_without_candidates_keeps_the_null_document(small_realm_batch):
    batch, vocab = small_realm_batch
    model = tiny_model(vocab.size).eval()
    model.null_document = False
    batch = type(batch)(**{**batch.__dict__, "cand_valid": torch.tensor([[True, True, True], [False] * 3])})
    with torch.no_grad():
        out = model(batch)
    assert torch.isinf(out["scores"][0, 0]) and torch.isfinite(out["scores"][1, 0])
    assert torch.isfinite(out["loss"])
