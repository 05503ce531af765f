"""The Open-QA service's request contract: what a client may send, checked before any model runs.

A request is bad input like a bad corpus line (docs/BAD_INPUT.md), so it gets the same treatment: one
message naming the field. The HTTP layer (cluster/serve.py) turns a `BadRequest` into a 4xx JSON body
`{"error": message, "field": name}`; nothing here knows about HTTP servers or Ray, so every rule is
tested without them.

    POST /v1/answer, /v1/explain   {"question": non-empty string, "k": optional int in 1..max_k}
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from core.errors import InputError

MAX_BODY_BYTES = 1_000_000   # a question is a sentence; a bigger body is a mistake or an attack
FIELDS = ("question", "k")


class BadRequest(InputError):
    """A request the service refuses: `status` (400 or 413) and the `field` at fault ("body" for the whole)."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"field '{field}': {message}")
        self.field, self.message, self.status = field, message, status

    def __reduce__(self):  # crosses from the reader replica to the HTTP ingress as itself
        return BadRequest, (self.field, self.message, self.status)


@dataclass(frozen=True)
class QARequest:
    question: str
    k: int | None  # None: the service's default (finetune.k)


def check_body_size(size: int | None, limit: int = MAX_BODY_BYTES) -> None:
    """Refuse an over-long body by its declared or read size, before it is parsed."""
    if size is not None and size > limit:
        raise BadRequest("body", f"{size} bytes, over the limit of {limit}", status=413)


def parse_request(body: bytes, max_k: int, limit: int = MAX_BODY_BYTES) -> QARequest:
    """A JSON body -> QARequest, or BadRequest naming the first field at fault."""
    check_body_size(len(body), limit)
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest("body", f"not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadRequest("body", f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise BadRequest("body", f"expected a JSON object, got {_type(data)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:  # a misspelt "k" silently ignored would answer with another k than asked for
        raise BadRequest(unknown[0], f"unknown field; the fields are {', '.join(FIELDS)}")
    if "question" not in data:
        raise BadRequest("question", "missing; give the question as a string")
    question = data["question"]
    if not isinstance(question, str):
        raise BadRequest("question", f"must be a string, got {_type(question)}")
    if not question.strip():
        raise BadRequest("question", "is empty")
    k = data.get("k")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest("k", f"must be an integer, got {_type(k)}")
        check_k(k, max_k)
    return QARequest(question.strip(), k)


def check_k(k: int, max_k: int) -> None:
    """1 <= k <= max_k (the service's limit, at most the corpus's live blocks)."""
    if not 1 <= k <= max_k:
        raise BadRequest("k", f"must be between 1 and {max_k}, got {k}")


def _type(value) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
