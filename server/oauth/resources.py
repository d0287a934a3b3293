"""RFC 8707 resource indicators: which audience (``aud``) an access token is for.

A client names the resource servers it wants a token for with ``resource`` (repeatable; the
form keeps the values space-separated). Only ``AUTH_RESOURCES`` and the default audience may
be asked for: anything else is ``invalid_target`` (§2), so a client cannot mint tokens for a
service the operator never listed. Without ``resource`` the token is for the default audience.

What a sign-in (refresh-token family) or an authorization code was granted is stored with it,
space-separated, empty for "the default audience". Each later token request may ask for any
part of that grant and nothing outside it (§2.1, §2.2): one sign-in can get a token for each of
its resource servers, none of which accepts the others' tokens.
"""

from __future__ import annotations

from authlib.oauth2.rfc6749.errors import OAuth2Error

from ..config import Settings


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]
    """RFC 8707 §2: the requested resource is invalid, unknown or not granted."""

    error = "invalid_target"
    status_code = 400


def requested(form: dict[str, str]) -> list[str]:
    """The ``resource`` values of a request, in order, once each."""
    return list(dict.fromkeys(form.get("resource", "").split()))


def allowed(resources: list[str], settings: Settings) -> list[str]:
    """§2: each must be a resource this server issues tokens for."""
    if not resources:  # the common case: no set to build
        return resources
    audiences = settings.audiences
    for resource in resources:
        if resource not in audiences:
            raise InvalidTargetError(
                "The resource is not one this server issues tokens for."
                if "#" not in resource
                else "A resource must be an absolute URI without a fragment."
            )
    return resources


def within(resources: list[str], granted: str, settings: Settings) -> list[str]:
    """§2.2: what a refresh or code exchange may have: the ``resources`` asked for, all of
    them within the grant; if none are asked for, the whole grant. A resource the operator
    has since removed from ``AUTH_RESOURCES`` is no longer part of any grant."""
    audiences = settings.audiences
    still = [r for r in (granted.split() or [settings.audience]) if r in audiences]
    if not resources:
        if not still:
            raise InvalidTargetError("The resources of this grant are no longer served.")
        return still
    if not set(resources) <= set(still):
        raise InvalidTargetError("A resource was asked for that this grant does not cover.")
    return resources


def audience(resources: list[str], settings: Settings) -> str | list[str]:
    """The ``aud`` claim: RFC 7519 §4.1.3, one string for one audience, else an array."""
    if not resources:
        return settings.audience
    return resources[0] if len(resources) == 1 else resources
