"""Open-QA data and scoring: QA JSONL reading, answer normalization, exact match, regex answers."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InputError
from core.records import read_jsonl


@dataclass
class QAExample:
    question: str
    answers: list[str]
    is_regex: bool = False
    gold_id: str | None = None
    extra: dict = field(default_factory=dict)


def read_qa(path: str) -> list[QAExample]:
    """JSONL with `question` and `answers` (or NQ-open's `answer`); CuratedTrec's `answer_is_regex`."""
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{where}: field 'question' missing, empty or not a string")
        answers = row.get("answers", row.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{where}: field 'answers' (or 'answer') must be a non-empty list of strings")
        is_regex = bool(row.get("answer_is_regex", False))
        if is_regex:
            for a in answers:
                try:
                    re.compile(a)
                except re.error as e:
                    raise InputError(f"{where}: answer {a!r} is not a valid regular expression: {e}") from None
        gold = row.get("gold_id")
        out.append(QAExample(q.strip(), answers, is_regex, str(gold) if gold is not None else None))
    if not out:
        raise InputError(f"{path}: no questions")
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD/NQ normalization: lower case, drop punctuation and articles, collapse white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: list[str], is_regex: bool = False) -> bool:
    """NQ/WebQuestions: normalized string equality with any answer. CuratedTrec: a regex that
    matches the normalized-case prediction (re.search, case-insensitive, as DrQA scores it)."""
    if is_regex:
        return any(re.search(a, prediction, flags=re.IGNORECASE) is not None for a in answers)
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)


def answer_in_text(text: str, answers: list[str], is_regex: bool = False) -> bool:
    """Does a block contain an answer (for retrieval recall)?"""
    if is_regex:
        return any(re.search(a, text, flags=re.IGNORECASE) is not None for a in answers)
    t = f" {normalize_answer(text)} "
    return any(f" {normalize_answer(a)} " in t for a in answers if normalize_answer(a))


def qa_file(cfg, key: str) -> str:
    """data.qa_train / data.qa_eval, defaulting to the synthetic QA that `prepare` generated."""
    given = getattr(cfg.data, key)
    if given:
        return given
    generated = Path(cfg.run_dir) / "data" / f"{key}.jsonl"
    if not cfg.data.corpus and generated.is_file():
        return str(generated)
    raise InputError(f"config key 'data.{key}': a QA JSONL file (question, answers) is required")
