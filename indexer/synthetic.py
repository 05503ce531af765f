"""Synthetic knowledge: invented people whose attributes can only be read from their own document.

Each entity gets one corpus document (title = its invented name) stating its home city, birth
year, profession and instrument among filler sentences (`relations="basic"`). `"confusable"` adds
a birth city, a work city, a graduation year and a marriage year: three cities and three years per
document, so a reader must match the relation a question asks about, not just the answer's type.
Pre-training and eval statements say one attribute in *new wording*, with that attribute as the
`answer` and the entity's document as `gold_id`; with `phrasing="disjoint"` the eval statements use
paraphrases that no pre-training statement uses (PARAPHRASES). Eval statements are about entities never seen in
pre-training statements, so predicting them needs retrieval + reading, not memorization. QA pairs
("What is the hometown of X?") follow the same split: qa_eval asks only about held-out entities.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from core.files import atomic_write_bytes

SYLLABLES = ["ka", "lo", "mer", "vin", "tra", "dus", "pel", "qua", "ro", "zen", "bal", "fi", "gor", "hu", "ix",
             "jo", "nar", "os", "ul", "wy", "sel", "tam", "bri", "cor", "dra", "eth", "fen", "gla", "ith", "mon"]
CITIES = ["paris", "london", "berlin", "madrid", "rome", "vienna", "prague", "dublin", "oslo", "lisbon", "cairo",
          "tokyo", "lima", "chicago", "boston", "seattle", "denver", "moscow", "athens", "warsaw", "sydney",
          "toronto", "montreal", "houston", "dallas", "miami", "atlanta", "geneva", "munich", "milan"]
PROFESSIONS = ["baker", "lawyer", "pilot", "farmer", "teacher", "doctor", "painter", "sailor", "chemist", "dentist",
               "architect", "engineer", "journalist", "butcher", "carpenter", "surgeon", "poet", "banker", "nurse",
               "astronomer", "librarian", "plumber", "soldier", "priest", "judge"]
INSTRUMENTS = ["piano", "violin", "guitar", "flute", "drums", "cello", "trumpet", "harp", "clarinet", "saxophone",
               "organ", "banjo", "accordion", "trombone", "oboe", "tuba", "harmonica", "bass", "ukulele", "mandolin"]
FILLER = ["{n} enjoys long walks in the countryside.", "{n} has written letters to friends abroad.",
          "Neighbours describe {n} as patient and kind.", "{n} keeps a small garden.",
          "On weekends {n} visits the market.", "{n} collects old maps."]

# Every sentence names its entity, so any sentence identifies the block (the Inverse Cloze Task
# needs that); one fact per sentence, one filler, short blocks to keep the tiny config fast.
# The first four relations are the basic corpus; "confusable" adds the last four (same answer types as city
# and year, different relations).
DOC_FACTS = {
    "city": ["{n} was raised in {v}.", "{n} comes from {v}."],
    "year": ["{n} was born in {v}.", "Records show that {n} was born in {v}."],
    "profession": ["{n} works as a {v}.", "{n} is employed as a {v}."],
    "instrument": ["{n} plays the {v}.", "{n} learned the {v} as a child."],
    "birth_city": ["{n} was born in the city of {v}.", "{n} is a native of {v}."],
    "work_city": ["{n} has an office in {v}.", "{n} commutes to work in {v}."],
    "graduation_year": ["{n} graduated in {v}.", "{n} finished university in {v}."],
    "marriage_year": ["{n} got married in {v}.", "The wedding of {n} took place in {v}."],
}
QUESTIONS = {
    "city": ["What is the hometown of {n}?", "Which city did {n} grow up in?"],
    "year": ["In what year was {n} born?", "When was {n} born?"],
    "profession": ["What is the occupation of {n}?", "What does {n} do for a living?"],
    "instrument": ["Which instrument does {n} play?", "What musical instrument does {n} play?"],
    "birth_city": ["Where was {n} born?", "In which city was {n} born?"],
    "work_city": ["In which city does {n} work?", "Where is the workplace of {n}?"],
    "graduation_year": ["In what year did {n} graduate?", "When did {n} finish university?"],
    "marriage_year": ["In what year did {n} marry?", "When did {n} get married?"],
}
STATEMENTS = {
    "city": ["The hometown of {n} is {v}.", "{n} grew up in the city of {v}."],
    "year": ["The birth year of {n} is {v}.", "{n} came into the world in {v}."],
    "profession": ["By trade, {n} is a {v}.", "The occupation of {n} is {v}."],
    "instrument": ["The musical instrument of {n} is the {v}.", "{n} is a player of the {v}."],
    "birth_city": ["The birthplace of {n} is {v}.", "{n} was delivered in a hospital in {v}."],
    "work_city": ["The workplace of {n} is in {v}.", "{n} goes to work in {v}."],
    "graduation_year": ["The graduation year of {n} is {v}.", "{n} earned a degree in {v}."],
    "marriage_year": ["The marriage year of {n} is {v}.", "{n} wed in {v}."],
}
# `phrasing="disjoint"`: pre-training statements draw from PARAPHRASES[rel][0] and eval statements from
# PARAPHRASES[rel][1], which share no template (nor DOC_FACTS' wording), and the answer moves around the
# sentence; a reader that learned the training wordings instead of matching the relation in z fails on them.
PARAPHRASES = {
    "city": (["The hometown of {n} is {v}.", "{n} grew up in the city of {v}.", "{v} is where {n} spent a childhood.",
              "As a child, {n} lived in {v}.", "Friends know {n} as a person from {v}.",
              "Growing up, {n} called {v} home."],
             ["{n}'s home town is {v}.", "It was in {v} that {n} was brought up.", "{n} hails from {v}."]),
    "year": (["The birth year of {n} is {v}.", "{n} came into the world in {v}.", "In {v}, {n} was born.",
              "{v} is the year {n} was born.", "Born in {v}, {n} is the subject of this note.",
              "The year of birth of {n} was {v}."],
             ["{n}'s date of birth falls in {v}.", "It was in {v} that {n} entered the world.",
              "{n}, born {v}, is recorded here."]),
    "profession": (["By trade, {n} is a {v}.", "The occupation of {n} is {v}.", "{n} earns a living as a {v}.",
                    "A {v} by profession, {n} is well known locally.", "The job of {n} is {v}.",
                    "{n} has always worked as a {v}."],
                   ["{n}'s profession is {v}.", "For work, {n} is a {v}.", "{n} makes money as a {v}."]),
    "instrument": (["The musical instrument of {n} is the {v}.", "{n} is a player of the {v}.",
                    "The {v} is the instrument {n} plays.", "In the evenings {n} practises the {v}.",
                    "{n} performs on the {v}.", "Music lovers have heard {n} on the {v}."],
                   ["{n}'s instrument is the {v}.", "It is the {v} that {n} plays.", "{n} is skilled at the {v}."]),
    "birth_city": (["The birthplace of {n} is {v}.", "{n} was delivered in a hospital in {v}.",
                    "{v} is the city where {n} was born.", "The city of birth of {n} is {v}.",
                    "{n} first saw daylight in {v}.", "At birth, {n} was in {v}."],
                   ["{n}'s place of birth is {v}.", "It was in {v} that {n} was born.",
                    "{n} was born a citizen of {v}."]),
    "work_city": (["The workplace of {n} is in {v}.", "{n} goes to work in {v}.", "{v} is where {n} works.",
                   "Each morning {n} travels to an office in {v}.", "The employer of {n} is based in {v}.",
                   "{n} holds a job in {v}."],
                  ["{n}'s office is located in {v}.", "It is in {v} that {n} works.", "{n} is employed in {v}."]),
    "graduation_year": (["The graduation year of {n} is {v}.", "{n} earned a degree in {v}.",
                         "In {v}, {n} graduated.", "{v} is the year {n} left university with a degree.",
                         "The diploma of {n} is dated {v}.", "{n} completed studies in {v}."],
                        ["{n}'s year of graduation is {v}.", "It was in {v} that {n} graduated.",
                         "{n} received a diploma in {v}."]),
    "marriage_year": (["The marriage year of {n} is {v}.", "{n} wed in {v}.", "In {v}, {n} was married.",
                       "{v} is the year {n} married.", "The wedding year of {n} is {v}.",
                       "{n} said yes at a wedding in {v}."],
                      ["{n}'s year of marriage is {v}.", "It was in {v} that {n} wed.",
                       "{n} has been married since {v}."]),
}
RELATIONS = {"basic": tuple(DOC_FACTS)[:4], "confusable": tuple(DOC_FACTS)}
PHRASINGS = ("shared", "disjoint")

def _name(rng: np.random.Generator, used: set) -> str:
    while True:
        parts = ["".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))).capitalize() for _ in range(2)]
        name = " ".join(parts)
        if name not in used:
            used.add(name)
            return name


def _extra_values(rng: np.random.Generator, values: dict, relations: tuple) -> None:
    """Values of the confusable relations, each unlike the entity's other cities and years."""
    for rel in relations[len(RELATIONS["basic"]):]:
        taken = set(values.values())
        while rel not in values or values[rel] in taken:
            values[rel] = (str(rng.choice(CITIES)).capitalize() if rel.endswith("city")
                           else str(int(rng.integers(1700, 2000))))


def _person(rng: np.random.Generator, used: set, rels: tuple, doc_id: str) -> tuple[dict, dict]:
    """One invented person: their document and their attribute values (relation -> value)."""
    name = _name(rng, used)
    values = {"city": str(rng.choice(CITIES)).capitalize(), "year": str(int(rng.integers(1700, 2000))),
              "profession": str(rng.choice(PROFESSIONS)), "instrument": str(rng.choice(INSTRUMENTS))}
    _extra_values(rng, values, rels)
    sentences = [DOC_FACTS[a][int(rng.integers(2))].format(n=name, v=v) for a, v in values.items()]
    sentences.append(str(rng.choice(FILLER)).format(n=name))
    text = " ".join(sentences[j] for j in rng.permutation(len(sentences)))
    return {"id": doc_id, "title": name, "text": text}, values


def _statement(rng: np.random.Generator, attr: str, held_out: bool, phrasing: str) -> str:
    if phrasing == "shared":  # one template pool for pre-training and eval statements
        return STATEMENTS[attr][int(rng.integers(2))]
    pool = PARAPHRASES[attr][1 if held_out else 0]
    return pool[int(rng.integers(len(pool)))]


def generate(num_entities: int, seed: int = 0, eval_fraction: float = 0.2, relations: str = "basic",
             phrasing: str = "shared") -> dict[str, list[dict]]:
    if relations not in RELATIONS:
        raise ValueError(f"relations {relations!r}: expected one of {', '.join(RELATIONS)}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing {phrasing!r}: expected one of {', '.join(PHRASINGS)}")
    rels = RELATIONS[relations]
    rng = np.random.default_rng(seed)
    used: set = set()
    corpus, train, evals, qa_train, qa_eval = [], [], [], [], []
    n_eval = max(1, int(num_entities * eval_fraction))
    for i in range(num_entities):
        doc, values = _person(rng, used, rels, f"ent{i:05d}")
        corpus.append(doc)
        name, doc_id = doc["title"], doc["id"]
        held_out = i >= num_entities - n_eval
        for attr, v in values.items():
            text = _statement(rng, attr, held_out, phrasing).format(n=name, v=v)
            (evals if held_out else train).append({"text": text, "answer": v, "gold_id": doc_id, "attribute": attr})
            question = QUESTIONS[attr][int(rng.integers(2))].format(n=name)
            (qa_eval if held_out else qa_train).append({"question": question, "answers": [v], "gold_id": doc_id})
    return {"corpus": corpus, "pretrain": train, "eval": evals, "qa_train": qa_train, "qa_eval": qa_eval}


def write_synthetic(out_dir: Path, num_entities: int, seed: int = 0, relations: str = "basic",
                    phrasing: str = "shared") -> dict[str, Path]:
    """corpus, pretrain, eval, qa_train and qa_eval .jsonl under out_dir (each written atomically)."""
    data = generate(num_entities, seed, relations=relations, phrasing=phrasing)
    paths = {}
    for name, rows in data.items():
        path = out_dir / f"{name}.jsonl"
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        paths[name] = path
    return paths


def new_people(num: int, seed: int, relations: str = "basic", exclude_names=(), id_prefix: str = "new"
               ) -> dict[str, list[dict]]:
    """People for a corpus edit: `corpus` documents (ids `{id_prefix}00000`...; names outside exclude_names)
    and `qa`, one question per fact with its `gold_id`, in generate()'s formats."""
    if relations not in RELATIONS:
        raise ValueError(f"relations {relations!r}: expected one of {', '.join(RELATIONS)}")
    rng = np.random.default_rng(seed)
    used = set(exclude_names)
    corpus, qa = [], []
    for i in range(num):
        doc, values = _person(rng, used, RELATIONS[relations], f"{id_prefix}{i:05d}")
        corpus.append(doc)
        for attr, v in values.items():
            question = QUESTIONS[attr][int(rng.integers(2))].format(n=doc["title"])
            qa.append({"question": question, "answers": [v], "gold_id": doc["id"], "attribute": attr})
    return {"corpus": corpus, "qa": qa}


def read_facts(doc: dict) -> dict[str, str]:
    """relation -> value of a generated document, read back from its sentences (DOC_FACTS' templates)."""
    name = re.escape(doc["title"])
    facts = {}
    for attr, templates in DOC_FACTS.items():
        for t in templates:
            pattern = re.escape(t).replace(re.escape("{n}"), name).replace(re.escape("{v}"), r"(\w+)")
            m = re.search(r"(?:^|(?<=\. ))" + pattern + r"(?= |$)", doc["text"])
            if m:
                facts[attr] = m.group(1)
    return facts
