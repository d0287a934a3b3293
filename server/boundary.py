"""The one boundary check for text that will be stored in, or searched against, the database.

PostgreSQL refuses NUL in text, every driver refuses a lone surrogate (not encodable as
UTF-8, RFC 3629 §3), and a ``String(n)`` column refuses more than ``n`` characters; each would
be a 500 from deep inside a request. ``text_problem`` says why a value cannot be stored, in
words that never repeat it; the pages and the authorization endpoint call it directly, the
JSON APIs through ``auth.Body``'s field validator and the ``NO_NUL`` pattern of their
parameters (so a refusal is the usual 422 ``validation_error``).
"""

from __future__ import annotations

from typing import Any


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


#: Text without NUL, as a ``pattern`` both Python and JSON Schema (ECMAScript) read the same
#: way. Every free-text field and parameter of the JSON APIs publishes it, so schema tools
#: (clients, schemathesis) know that NUL is refused; lone surrogates, which no schema tool
#: generates, are refused by ``auth.Body``'s validator.
NO_NUL = r"^[^\x00]*$"
#: An id in a path (users, sign-ins): ours are 32 hex digits (``models.new_id``); anything
#: outside this set is refused before a lookup, and schema tools can generate invalid ones.
PATH_ID = r"^[A-Za-z0-9_-]{1,64}$"
