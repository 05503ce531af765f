import numpy as np

from indexer.tokenizer import Vocab, load_tokenizer, resolve_vocab
from trainer.data import Example, mask_example
from trainer.masking import date_spans, find_salient_spans, split_sentences

TEXT = "Marie Curie moved to Paris in 1891 and won the Nobel Prize on 10 December 1903."


def spans_text(text, spans):
    return {text[s:e] for s, e in spans}


def test_salient_spans_cover_entities_and_dates_with_spacy():
    found = spans_text(TEXT, find_salient_spans([TEXT], "spacy")[0])
    assert "Marie Curie" in found and "Paris" in found
    assert "1891" in found and "10 December 1903" in found


def test_regex_tagger_still_finds_dates_and_names():
    found = spans_text(TEXT, find_salient_spans([TEXT], "regex")[0])
    assert {"Paris", "1891", "10 December 1903"} <= found
    assert any("Nobel Prize" in f for f in found)


def test_date_regex_formats():
    text = "On March 3, 1901 and 4 July 1776, in May 1968, on 2001-09-11, during the 1990s and in 1066."
    assert spans_text(text, date_spans(text)) == {"March 3, 1901", "4 July 1776", "May 1968", "2001-09-11",
                                                  "1990s", "1066"}


def test_sentence_splitter():
    text = "First one here. Second (a bit longer)! Third? \"Quoted start.\" 1990 was a year."
    assert [text[s:e] for s, e in split_sentences(text)] == [
        "First one here.", "Second (a bit longer)!", "Third?", "\"Quoted start.\"", "1990 was a year."]


def test_given_answer_is_the_masked_span_and_targets_are_its_wordpieces():
    tok = load_tokenizer(resolve_vocab("minilm"))
    vocab = Vocab(tok)
    ex = Example(text="The capital of Zorbland is Quuxville.", spans=[[27, 36]], fixed_span=True)
    q = mask_example(ex, tok, vocab, 32, np.random.default_rng(0), "salient")
    assert (q.ids[q.positions] == vocab.mask).all()
    assert tok.decode(q.targets.tolist()).replace(" ", "") == "quuxville"
    assert (q.ids == vocab.mask).sum() == len(q.positions)


def test_random_mode_masks_whole_words():
    tok = load_tokenizer(resolve_vocab("minilm"))
    vocab = Vocab(tok)
    ex = Example(text="Antidisestablishmentarianism confuses everyone in Ulaanbaatar.")
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = mask_example(ex, tok, vocab, 32, rng, "random", 2)
        words = tok.decode(q.targets.tolist()).split()
        assert all(w in ex.text.lower() for w in words)


def test_uniform_mode_masks_single_wordpieces_as_many_as_the_salient_span():
    tok = load_tokenizer(resolve_vocab("minilm"))
    vocab = Vocab(tok)
    text = "Yesterday the famous singer Quuxville Zorbland visited the old harbour of the northern city."
    start = text.index("Quuxville")
    ex = Example(text=text, spans=[[start, start + len("Quuxville Zorbland")]], fixed_span=True)
    salient = mask_example(ex, tok, vocab, 64, np.random.default_rng(0), "salient")
    n = len(salient.positions)
    assert n >= 3
    x = salient.ids.copy()
    x[salient.positions] = salient.targets  # x unmasked
    rng = np.random.default_rng(0)
    contiguous, counts = 0, np.zeros(len(salient.ids))
    for _ in range(300):
        q = mask_example(ex, tok, vocab, 64, rng, "uniform", 3, mask_given=False)
        assert len(q.positions) == n and (q.ids == vocab.mask).sum() == n  # the same number of masked tokens
        assert (q.ids[q.positions] == vocab.mask).all() and (q.targets == x[q.positions]).all()
        contiguous += bool((np.diff(q.positions) == 1).all())
        counts[q.positions] += 1
    assert contiguous < 30  # independent positions, not a span (a span would always be contiguous)
    body = counts[1:-1]  # every wordpiece of x, never [CLS]/[SEP]
    assert counts[0] == counts[-1] == 0 and body.min() > 0
    assert np.abs(body / 300 - n / len(body)).max() < 0.12  # each position at about the same rate
    # evaluation (mask_given=True) still scores the given answer in every mode
    q = mask_example(ex, tok, vocab, 64, np.random.default_rng(0), "uniform", 3)
    assert (q.positions == salient.positions).all()


def test_random_mode_in_pretraining_replaces_a_given_answer():
    tok = load_tokenizer(resolve_vocab("minilm"))
    vocab = Vocab(tok)
    ex = Example(text="The capital of Zorbland is Quuxville.", spans=[[27, 36]], fixed_span=True)
    given = mask_example(ex, tok, vocab, 32, np.random.default_rng(0), "random", 2)
    rng = np.random.default_rng(0)
    spans = {tuple(mask_example(ex, tok, vocab, 32, rng, "random", 2, mask_given=False).positions) for _ in range(30)}
    assert len(spans) > 3 and all(np.all(np.diff(s) == 1) for s in spans)
    assert tuple(given.positions) in {tuple(mask_example(ex, tok, vocab, 32, np.random.default_rng(i), "salient")
                                            .positions) for i in range(2)}
