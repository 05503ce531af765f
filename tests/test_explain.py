"""`launch.py explain`: per-block shares of p(y|x) that sum to 1, leave-one-out answers that equal a fresh
pass without the block, the CLI's two output forms and its one-line errors; and evaluate's `top_share`."""
import json
import shutil

import numpy as np
import pytest

import launch
from cluster.config import load_config
from tests.conftest import ROOT, small_qa_run

# explain reads these from the config, not the checkpoint: the tiny model's lengths, not tiny.yaml's
LENGTHS = ["model.query_max_len=32", "model.reader_max_len=96", "threads=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared run with an ICT model (the pre-trained REALM model text= mode reads) and a QA model
    fine-tuned from it; `bare` has a block store and no model."""
    small = small_qa_run(tmp_path_factory.mktemp("explain"))
    cfg, run, data = small["cfg"], small["run"], small["data"]
    bare = run.parent / "bare"
    shutil.copytree(run / "blocks", bare / "blocks")  # the block store as prepare left it, no model
    qa = [json.loads(line) for line in open(data["qa_eval"])]
    pre = [json.loads(line) for line in open(data["pretrain"])]
    return {"cfg": cfg, "run": run, "bare": bare, "question": qa[0]["question"],
            "text": pre[0]["text"], "answer": pre[0]["answer"]}


def cfg_for(trained, *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={trained['run']}", *LENGTHS, "finetune.k=3",
                                                        "eval.k=3", *overrides], "explain")


def check_shares(result, n_blocks):
    blocks = result["blocks"]
    assert len(blocks) == n_blocks
    assert sum(b["share"] for b in blocks) == pytest.approx(1.0, abs=1e-5)
    assert sum(b["p_z"] for b in blocks) == pytest.approx(1.0, abs=1e-5)
    for b in blocks:  # the share is p(z|x) p(y|z,x) / p(y|x), p(y|x) = Σ_z p(z|x) p(y|z,x)
        assert b["share"] == pytest.approx(b["p_z"] * b["p_y_given_z"] / result["probability"], rel=1e-4, abs=1e-7)
    assert result["probability"] == pytest.approx(sum(b["p_z"] * b["p_y_given_z"] for b in blocks), rel=1e-5)


def test_question_mode_shares_sum_to_one_and_leave_one_out_equals_a_fresh_pass(trained):
    from trainer.explain import explain, explain_question
    from trainer.qa_system import load_qa_system

    cfg = cfg_for(trained, f"question={trained['question']}")
    result = explain(cfg)
    check_shares(result, 3)
    assert result["model"].endswith("models/qa") and result["prediction"]
    best = next(b for b in result["blocks"] if b["block_id"] == result["block_id"])  # the answer's own block
    assert best["p_y_given_z"] > 0 and f"[[{result['prediction']}]]" in best["evidence"]
    system = load_qa_system(cfg, "auto")
    cand = np.array([[b["block_id"] for b in result["blocks"]]])
    for j, blk in enumerate(result["blocks"]):
        fresh = explain_question(system, trained["question"], 3, cfg.finetune.max_answer_len,
                                 candidates=np.delete(cand, j, axis=1))
        assert [b["block_id"] for b in fresh["blocks"]] == np.delete(cand[0], j).tolist()
        check_shares(fresh, 2)
        assert blk["without"]["prediction"] == fresh["prediction"]
        assert blk["without"]["probability"] == pytest.approx(fresh["probability"], rel=1e-4, abs=1e-6)
    # one candidate: leaving it out leaves nothing to answer from
    single = explain_question(system, trained["question"], 3, cfg.finetune.max_answer_len, candidates=cand[:, :1])
    assert single["blocks"][0]["share"] == pytest.approx(1.0)
    assert single["blocks"][0]["without"] == {"prediction": None, "probability": None}


def test_text_mode_masks_the_answer_and_leave_one_out_equals_a_fresh_pass(trained):
    from trainer.checkpoint import load_model
    from trainer.explain import explain, explain_text
    from trainer.run import Run

    text, answer = trained["text"], trained["answer"]
    cfg = cfg_for(trained, f"text={text}", f"answer={answer}")
    result = explain(cfg)
    check_shares(result, 4)  # the top 3 blocks and the null document
    assert result["model"].endswith("models/ict")
    assert result["masked_text"] == text.replace(answer, "[MASK]", 1) and result["answer"] == answer
    assert result["blocks"][-1]["block_id"] is None and result["blocks"][-1]["evidence"] == ""
    assert isinstance(result["correct"], bool) and 0 < result["answer_probability"] <= 1
    run = Run.open(cfg)
    model, _ = load_model(run.dir / "models" / "ict")
    cand = np.array([[b["block_id"] for b in result["blocks"][:-1]]])
    for j, blk in enumerate(result["blocks"][:-1]):
        fresh = explain_text(model, None, run, text, answer, 3, candidates=np.delete(cand, j, axis=1))
        check_shares(fresh, 3)
        assert blk["without"]["prediction"] == fresh["prediction"]
        assert blk["without"]["probability"] == pytest.approx(fresh["probability"], rel=1e-4, abs=1e-6)
    assert result["blocks"][-1]["without"]["probability"] is not None  # the null document can be left out too


def test_evaluate_writes_each_answers_top_block_share(trained):
    from trainer.evaluate import evaluate_openqa
    from trainer.explain import explain

    evaluate_openqa(trained["cfg"])
    preds = [json.loads(line) for line in open(trained["run"] / "predictions.jsonl")]
    assert len(preds) == 4 and all(0 <= p["top_share"] <= 1 for p in preds)
    result = explain(cfg_for(trained, f"question={preds[0]['question']}"))
    top = max(result["blocks"], key=lambda b: b["share"])
    assert result["prediction"] == preds[0]["prediction"]
    assert preds[0]["top_share"] == pytest.approx(top["share"], abs=1e-5)


def test_cli_prints_text_or_one_json_object(trained, capsys):
    base = ["explain", f"run_dir={trained['run']}", *LENGTHS]
    assert launch.main([*base, f"question={trained['question']}", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["question"] == trained["question"] and len(result["blocks"]) == 3
    assert launch.main([*base, f"question={trained['question']}"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Q: {trained['question']}\nA: {result['prediction']}   p(y|x) ")
    assert text.count("block ") == 3 and "without it" in text
    assert launch.main([*base, f"text={trained['text']}", f"answer={trained['answer']}"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("x: ") and "[MASK]" in text.splitlines()[0] and "null document" in text


@pytest.mark.parametrize("args, expected", [
    ([], "config key 'question': explain needs question="),
    (["answer=Paris"], "config key 'question': explain needs question="),
    (["text=Ada was born in Paris."], "config key 'answer': give the substring of text to mask"),
    (["text=Ada was born in Paris.", "answer=London"],
     "config key 'answer': answer 'London' is not a non-empty substring of text"),
    (["question=Where?", "text=Ada was born in Paris.", "answer=Paris"], "give one of them, not both"),
    (["text=Ada was born in Paris.", "answer=Paris", "eval.model=qa"],
     "is a QA model; text=... needs a pre-trained one"),
])
def test_bad_explain_input_is_one_line_exit_2(trained, capsys, args, expected):
    rc = launch.main(["explain", f"run_dir={trained['run']}", *LENGTHS, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_an_answer_too_long_to_mask_is_refused(trained, capsys):
    text = "Ada " + "Lovelace " * 13 + "was born."
    rc = launch.main(["explain", f"run_dir={trained['run']}", *LENGTHS, f"text={text}",
                      "answer=" + "Lovelace " * 12 + "Lovelace"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: config key 'answer': ") and "more than 12" in err[-1], err


@pytest.mark.parametrize("where, args, expected", [
    ("nowhere", ["question=Where?"], "no block store here (run `launch.py prepare` first)"),
    ("bare", ["question=Where?"], "no trained model"),
    ("bare", ["text=Ada was born in Paris.", "answer=Paris"], "no trained model"),
])
def test_explain_before_a_model_exists_is_one_line_exit_2(trained, tmp_path, capsys, where, args, expected):
    run_dir = tmp_path / "nowhere" if where == "nowhere" else trained["bare"]
    rc = launch.main(["explain", f"run_dir={run_dir}", *LENGTHS, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
