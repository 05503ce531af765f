import math

import pytest
import torch

from core.errors import InputError
from tests.conftest import write_jsonl
from trainer.model import SpanHead, span_marginal_log_likelihood
from trainer.qa import answer_in_text, exact_match, normalize_answer, read_qa


@pytest.mark.parametrize("raw, norm", [
    ("The Beatles", "beatles"),
    ("  a  Tale of Two   Cities! ", "tale of two cities"),
    ("U.S.A.", "usa"),
    ("An apple, the pear and a plum.", "apple pear and plum"),
    ("Theodore", "theodore"),          # 'the' inside a word stays
    ("1,000", "1000"),
    ("Don't", "dont"),
])
def test_normalization_follows_squad_conventions(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_against_answer_lists():
    assert exact_match("the Eiffel Tower", ["Eiffel Tower", "La tour Eiffel"])
    assert exact_match("Eiffel tower.", ["The Eiffel Tower"])
    assert not exact_match("Eiffel", ["Eiffel Tower"])
    assert not exact_match("", ["x"])


def test_regex_answers_match_as_regular_expressions():
    answers = [r"\b(1,?000|one thousand)\b"]
    assert exact_match("about 1000 people", answers, is_regex=True)
    assert exact_match("One Thousand", answers, is_regex=True)
    assert not exact_match("10000", answers, is_regex=True)
    assert answer_in_text("It had one thousand rooms.", answers, is_regex=True)


def test_answer_in_text_matches_whole_normalized_tokens():
    assert answer_in_text("He was born in Paris, France.", ["paris"])
    assert not answer_in_text("He was born in Parisville.", ["Paris"])


def test_qa_reader_accepts_answers_and_nq_answer_and_names_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q1?", "answers": ["a"]},
                                               {"question": "q2?", "answer": ["b", "c"]},
                                               {"question": "q3?", "answer": ["x+"], "answer_is_regex": True}])
    qa = read_qa(str(path))
    assert [q.answers for q in qa] == [["a"], ["b", "c"], ["x+"]] and qa[2].is_regex
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q1?", "answers": ["a"]}, {"question": "q2?"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'answers'"):
        read_qa(str(bad))


def test_span_marginalization_equals_brute_force_sum():
    torch.manual_seed(0)
    B, K, L, A = 2, 3, 5, 2
    retrieval = torch.randn(B, K, dtype=torch.float64)
    spans = torch.randn(B, K, L, A, dtype=torch.float64)
    spans[:, :, -1, 1] = float("-inf")           # a span that runs past the block
    answer = torch.zeros(B, K, L, A, dtype=torch.bool)
    answer[0, 0, 1, 0] = answer[0, 2, 3, 1] = answer[0, 2, 0, 0] = True
    answer[1, 1, 2, 1] = True
    got = span_marginal_log_likelihood(retrieval, spans, answer)
    for b in range(B):
        p_z = torch.softmax(retrieval[b], 0)
        total = 0.0
        for k in range(K):
            valid = spans[b, k][torch.isfinite(spans[b, k])]
            z_norm = sum(math.exp(v) for v in valid.tolist())
            total += p_z[k].item() * sum(math.exp(spans[b, k, i, a].item()) / z_norm
                                         for i in range(L) for a in range(A) if answer[b, k, i, a])
        assert got[b].item() == pytest.approx(math.log(total), rel=1e-6)  # float32 inside


def test_span_head_scores_only_allowed_spans():
    head = SpanHead(8)
    h = torch.randn(2, 6, 8)
    allowed = torch.zeros(2, 6, 3, dtype=torch.bool)
    allowed[:, 2:4, :2] = True
    scores = head(h, allowed)
    assert torch.isfinite(scores[allowed]).all() and torch.isinf(scores[~allowed]).all()


def test_finetune_trains_query_tower_and_reader_but_never_the_doc_encoder(tiny_cfg, tiny_corpus):
    import json

    from trainer.checkpoint import load_model
    from trainer.evaluate import evaluate_openqa
    from trainer.finetune import finetune
    from trainer.ict import ict
    from trainer.prepare import prepare
    from trainer.qa_system import query

    cfg = tiny_cfg("ict.steps=2", f"data.qa_train={tiny_corpus['qa_train']}", f"data.qa_eval={tiny_corpus['qa_eval']}",
                   "finetune.steps=3", "finetune.k=3", "finetune.batch_size=4", "finetune.retriever_lr=1e-3",
                   "finetune.early_k=20", "data.max_eval_examples=6", "task=openqa",
                   "question=What is the hometown of Nobody?")
    prepare(cfg)
    ict(cfg)
    start, _ = load_model(f"{cfg.run_dir}/models/ict")
    finetune(cfg)
    tuned, meta = load_model(f"{cfg.run_dir}/models/qa")
    assert meta["kind"] == "openqa_model" and meta["early_k"] == 20
    logged = [json.loads(line) for line in open(f"{cfg.run_dir}/events.jsonl") if '"early_loss"' in line]
    assert logged and all(0 < e["early_answer_found"] <= 1 for e in logged)
    for (name, p0), p1 in zip(start.retriever.doc_tower.state_dict().items(),
                              tuned.retriever.doc_tower.state_dict().values()):
        assert torch.equal(p0, p1), name
    changed = [not torch.equal(a, b) for a, b in zip(start.retriever.query_tower.state_dict().values(),
                                                    tuned.retriever.query_tower.state_dict().values())]
    assert any(changed)
    metrics = evaluate_openqa(cfg)
    assert metrics["n"] == 6 and metrics["k"] == 3 and 0 <= metrics["exact_match"] <= 1
    preds = [json.loads(line) for line in open(f"{cfg.run_dir}/predictions.jsonl")]
    assert len(preds) == 6 and all(len(p["top_k"]) == 3 and len(p["scores"]) == 3 for p in preds)
    # the index the QA model reads is the one its (frozen) doc encoder built at ICT time
    assert metrics["index_version"] == 1
    result = query(cfg)
    assert result["question"] == cfg.question and len(result["blocks"]) == 3


def test_early_update_loss_against_brute_force_and_it_trains_the_query_tower(tiny_cfg, tiny_corpus):
    """ORQA's early update: -log Σ_{z in top-k, answer in z} p(z|x), p(z|x) a softmax over the top k; a step on
    it raises that probability; the doc embeddings never change."""
    from indexer.embed import pad_batch
    from trainer.ict import ict
    from trainer.prepare import prepare
    from trainer.qa import qa_file
    from trainer.qa_system import load_qa_system

    cfg = tiny_cfg("ict.steps=2", f"data.qa_train={tiny_corpus['qa_train']}")
    prepare(cfg)
    ict(cfg)
    system = load_qa_system(cfg, "ict")
    qs = read_qa(qa_file(cfg, "qa_train"))[:6]
    questions = [e.question for e in qs]

    def early_loss():
        return system.early_update_loss(system.embed_questions(questions)[1], questions, [e.answers for e in qs],
                                        [e.is_regex for e in qs], 20)

    loss, share = early_loss()
    with torch.no_grad():  # brute force: each question's top 20 by inner product, its answer blocks by string
        q = system.model.retriever.embed_queries(*pad_batch(system.encode_questions(questions), system.run.vocab.pad))
        terms = []
        for i, e in enumerate(qs):
            scores = system.doc_emb @ q[i].float()
            top = torch.topk(scores, 20).indices
            p = torch.softmax(scores[top], 0)
            hit = [answer_in_text(system.run.store.text(int(b)), e.answers) for b in top]
            if any(hit):
                terms.append(-torch.log(sum(p[j] for j in range(20) if hit[j])))
    assert terms and share == len(terms) / len(qs)
    assert torch.allclose(loss.detach(), torch.stack(terms).mean(), atol=1e-4)
    docs = system.doc_emb.clone()
    opt = torch.optim.SGD(system.model.retriever.query_tower.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        early_loss()[0].backward()
        opt.step()
    assert early_loss()[0] < loss and torch.equal(system.doc_emb, docs)


def test_confusable_synthetic_corpus_needs_the_relation_not_the_type():
    import re

    from indexer.synthetic import generate

    basic, hard = generate(30, seed=1), generate(30, seed=1, relations="confusable")
    assert generate(30, seed=1, relations="basic") == basic  # the default corpus is unchanged
    for doc in hard["corpus"]:
        years = re.findall(r"\b1[789]\d\d\b", doc["text"])
        assert len(years) == len(set(years)) == 3  # three different years in every document
    docs = {d["id"]: d["text"] for d in hard["corpus"]}
    assert len(hard["qa_train"]) + len(hard["qa_eval"]) == 2 * (len(basic["qa_train"]) + len(basic["qa_eval"]))
    for qa in hard["qa_train"] + hard["qa_eval"]:
        assert qa["answers"][0] in docs[qa["gold_id"]]
    held_out = {qa["gold_id"] for qa in hard["qa_eval"]}
    assert held_out and not held_out & {qa["gold_id"] for qa in hard["qa_train"]}
    with pytest.raises(ValueError, match="relations 'hard'"):
        generate(3, relations="hard")


def test_disjoint_phrasing_keeps_eval_wordings_out_of_pre_training():
    import re

    from indexer.synthetic import PARAPHRASES, generate

    def pattern(t, answer):
        return re.escape(t).replace(re.escape("{n}"), ".+").replace(re.escape("{v}"), re.escape(answer))

    def template(text, answer, rel):  # which of rel's paraphrase templates wrote text
        hits = [(side, t) for side in (0, 1) for t in PARAPHRASES[rel][side]
                if re.fullmatch(pattern(t, answer), text)]
        assert len(hits) == 1, (text, hits)
        return hits[0]

    data = generate(200, seed=2, relations="confusable", phrasing="disjoint")
    assert generate(30, seed=1) == generate(30, seed=1, phrasing="shared")  # the default corpus is unchanged
    seen = {0: set(), 1: set()}
    for side, rows in ((0, data["pretrain"]), (1, data["eval"])):
        for row in rows:
            got_side, t = template(row["text"], row["answer"], row["attribute"])
            assert got_side == side
            seen[side].add(t)
    assert not seen[0] & seen[1]
    assert len(seen[1]) == sum(len(p[1]) for p in PARAPHRASES.values())  # every eval wording is used
    docs = {d["id"]: d["text"] for d in data["corpus"]}
    assert not any(row["text"] in docs[row["gold_id"]] for row in data["eval"])  # the documents keep their own wording
    assert len({r["gold_id"] for r in data["eval"]}) == 40 and not (
        {r["gold_id"] for r in data["eval"]} & {r["gold_id"] for r in data["pretrain"]})
    with pytest.raises(ValueError, match="phrasing 'new'"):
        generate(3, phrasing="new")


@pytest.mark.parametrize("relations", ["basic", "confusable"])
def test_new_people_are_new_and_facts_read_back_from_documents(relations):
    """The corpus-edit benchmark's people: fresh names and ids, one question per fact; read_facts recovers
    every value a generated document states (and nothing from another person's document)."""
    from indexer.synthetic import RELATIONS, generate, new_people, read_facts

    data = generate(60, seed=1, relations=relations)
    names = {d["title"] for d in data["corpus"]}
    new = new_people(30, seed=2, relations=relations, exclude_names=names)
    assert not names & {d["title"] for d in new["corpus"]}
    assert len({d["id"] for d in new["corpus"]}) == 30 and all(d["id"].startswith("new") for d in new["corpus"])
    for doc in data["corpus"] + new["corpus"]:
        facts = read_facts(doc)
        assert set(facts) == set(RELATIONS[relations])
        assert all(v in doc["text"] for v in facts.values())
    by_doc = {d["id"]: read_facts(d) for d in new["corpus"]}
    assert len(new["qa"]) == 30 * len(RELATIONS[relations])
    assert all(q["answers"] == [by_doc[q["gold_id"]][q["attribute"]]] for q in new["qa"])
    other = {**data["corpus"][0], "title": data["corpus"][1]["title"]}
    assert read_facts(other) == {}
