"""What a check ends with: ``PASS``, or ``CheckFailed`` / ``CheckSkipped`` raised with a reason."""

from __future__ import annotations

from typing import Literal

Status = Literal["PASS", "FAIL", "SKIP"]


class CheckFailed(Exception):
    """The server does not do what SPEC.md says; the message says what was seen."""


class CheckSkipped(Exception):
    """The check needs credentials that were not given, or a grant the client lacks."""
