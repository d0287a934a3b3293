"""The one boundary check for text that will be stored in, or searched against, the database.

PostgreSQL refuses NUL in text, every driver refuses a lone surrogate (not encodable as
UTF-8, RFC 3629 §3), and a ``String(n)`` column refuses more than ``n`` characters; each would
be a 500 from deep inside a request. ``text_problem`` says why a value cannot be stored, in
words that never repeat it; the pages and the authorization endpoint call it directly, the
JSON APIs through ``StoredText`` (a pydantic type, so a refusal is the usual 422
``validation_error``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator


def column_length(column: Any) -> int | None:
    """The declared length of a ``String(n)`` column (``Model.attr``); None for ``Text``."""
    length = getattr(column.type, "length", None)
    return length if isinstance(length, int) else None


def text_problem(value: str, max_length: int | None = None) -> str | None:
    """Why ``value`` cannot be stored or searched (a message without the value), or None."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid UTF-8 text (no lone surrogates)"
    if max_length is not None and len(value) > max_length:
        return f"must be at most {max_length} characters"
    return None


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"Text {problem}.")
    return value


#: ``str`` that can be stored or searched: no NUL, no lone surrogate. The column's length is
#: the field's own ``max_length`` (``Field``/``Query``), checked first.
StoredText = Annotated[str, AfterValidator(_storable)]
