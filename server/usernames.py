"""The username profile: which new usernames are accepted, so none can pass for another.

On top of ``manage.USERNAME_RE`` (1-150 letters, digits and ``. @ + - _``), a new username must

1. be valid under RFC 8265 §3.3 *UsernameCaseMapped* (the PRECIS IdentifierClass of RFC 8264
   §4.2, with width mapping, case mapping, NFC and the Bidi Rule of RFC 5893), checked with
   precis-i18n. That refuses what cannot be seen or tells nothing apart: default-ignorable
   code points (U+200B ZERO WIDTH SPACE, U+3164 HANGUL FILLER, …), old Hangul jamo (U+1160
   HANGUL JUNGSEONG FILLER; U+FFA0 HALFWIDTH HANGUL FILLER maps to it), compatibility
   characters (``ﬁ``, ``²``), controls and unassigned code points;
2. be *highly restrictive* (UTS #39 §5.2): all of one script, besides Common and Inherited
   characters (digits, ``. @ + - _``), where Han with Hiragana and Katakana (Japanese), Han with
   Bopomofo and Han with Hangul (Korean) count as one, and Latin may join any of those three.
   A Cyrillic ``а`` in a Latin name is refused. Scripts are Unicode's Script_Extensions (UAX
   #24), as fontTools' ``unicodedata`` tables carry them.

This is a check at creation only: the stored ``username_key`` (``passwords.normalize_username``,
NFKC + casefold) is unchanged, so every account made before still signs in with its name.
Whole-script confusables (a name written entirely in Cyrillic letters that look Latin) are not
detected: that needs UTS #39's confusables data.
"""

from __future__ import annotations

from collections.abc import Iterable

import precis_i18n
from fontTools.unicodedata import script_extension  # type: ignore[import-untyped]

PROFILE = precis_i18n.get_profile("UsernameCaseMapped")
#: Characters of every script (UTS #39 §5.1): they never make a name mixed.
COMMON_SCRIPTS = frozenset({"Zyyy", "Zinh"})
#: UTS #39 §5.1 augmented script sets: Jpan, Kore and Hanb name the writing systems that
#: combine Han with kana, Hangul and Bopomofo.
AUGMENTED = {
    "Hani": frozenset({"Hanb", "Jpan", "Kore"}),
    "Hira": frozenset({"Jpan"}),
    "Kana": frozenset({"Jpan"}),
    "Hang": frozenset({"Kore"}),
    "Bopo": frozenset({"Hanb"}),
}
#: The writing systems Latin may be mixed with (UTS #39 §5.2, "Highly Restrictive").
WITH_LATIN = frozenset({"Jpan", "Hanb", "Kore"})


class UsernameError(ValueError):
    """The username breaks the profile; the message says how."""


def _scripts(char: str) -> frozenset[str]:
    found: set[str] = set(script_extension(char))
    return frozenset(found)


def _resolved(text: Iterable[str]) -> frozenset[str] | None:
    """UTS #39 §5.1 resolved script set: the scripts every character belongs to (augmented);
    ``None`` for "all scripts" (no character of a particular script)."""
    resolved: frozenset[str] | None = None
    for char in text:
        scripts = _scripts(char)
        if scripts & COMMON_SCRIPTS:
            continue
        augmented = scripts.union(*(AUGMENTED.get(script, frozenset()) for script in scripts))
        resolved = augmented if resolved is None else resolved & augmented
    return resolved


def highly_restrictive(text: str) -> bool:
    """UTS #39 §5.2: single-script, or Latin plus Japanese, Chinese (Bopomofo) or Korean."""
    resolved = _resolved(text)
    if resolved is None or resolved:
        return True
    rest = _resolved(char for char in text if "Latn" not in _scripts(char))
    return rest is None or bool(rest & WITH_LATIN)


def check_username(username: str) -> None:
    """Raise ``UsernameError`` unless ``username`` fits the profile (see the module)."""
    try:
        enforced: str = PROFILE.enforce(username)
    except UnicodeEncodeError as error:
        if error.reason.endswith("bidi_rule"):
            # RFC 5893 §2: right-to-left letters with left-to-right ones (or digits of another
            # kind) can display in an order that reads as another name.
            raise UsernameError(
                "username must not mix right-to-left and left-to-right writing"
            ) from None
        # The error names a character of the mapped string; width mapping is one to one, so
        # the same place in what was typed, unless case mapping changed the length.
        mapped: str = error.object
        char = (username if len(mapped) == len(username) else mapped)[error.start]
        raise UsernameError(
            f"username must not contain U+{ord(char):04X}: usernames are made of visible"
            " letters and digits"
        ) from None
    if not highly_restrictive(enforced):
        raise UsernameError("username must not mix letters of different scripts")
