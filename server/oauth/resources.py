"""RFC 8707 resource indicators: which audience (``aud``) an access token is for.

A client names the resource servers it wants a token for with ``resource`` (repeatable; the
form keeps the values space-separated). Only ``AUTH_RESOURCES`` and the default audience may
be asked for: anything else is ``invalid_target`` (§2), so a client cannot mint tokens for a
service the operator never listed. Without ``resource`` the token is for the default audience.

What a sign-in (refresh-token family) or an authorization code was granted is stored with it,
space-separated, empty for "the default audience". Each later token request may ask for any
part of that grant and nothing outside it (§2.1, §2.2): one sign-in can get a token for each of
its resource servers, none of which accepts the others' tokens.

A client may further be limited to some of ``AUTH_RESOURCES`` (``Client.resources``; ``None``:
all of them). A resource outside its list is refused exactly as one the server does not serve,
at the authorization request and at every grant, and with the same description, so that a
limited client does not learn which other resources the server serves. The default audience is
always the client's. A narrowed list also narrows every grant already made, as removing a
resource from ``AUTH_RESOURCES`` does (``within``).
"""

from __future__ import annotations

from authlib.oauth2.rfc6749.errors import OAuth2Error

from ..config import Settings
from ..models import Client

#: The one description a limited client gets for any resource outside its list.
NOT_THE_CLIENTS = "The resource is not one this client may have tokens for."


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]
    """RFC 8707 §2: the requested resource is invalid, unknown or not granted."""

    error = "invalid_target"
    status_code = 400


def requested(form: dict[str, str]) -> list[str]:
    """The ``resource`` values of a request, in order, once each."""
    return list(dict.fromkeys(form.get("resource", "").split()))


def permitted(client: Client, settings: Settings) -> frozenset[str]:
    """What ``client`` may have tokens for: the default audience and those of its resources
    this server still serves (all of ``AUTH_RESOURCES`` when it has no list)."""
    audiences = settings.audiences
    limited = client.resource_list
    if limited is None:
        return audiences
    return frozenset([settings.audience, *(r for r in limited if r in audiences)])


def allowed(resources: list[str], settings: Settings, client: Client) -> list[str]:
    """§2: each must be a resource this server issues tokens for, to this client."""
    if not resources:  # the common case: no set to build
        return resources
    mine = permitted(client, settings)
    for resource in resources:
        if resource in mine:
            continue
        if "#" in resource:
            raise InvalidTargetError("A resource must be an absolute URI without a fragment.")
        if client.resource_list is not None:
            raise InvalidTargetError(NOT_THE_CLIENTS)
        raise InvalidTargetError("The resource is not one this server issues tokens for.")
    return resources


def within(resources: list[str], granted: str, settings: Settings, client: Client) -> list[str]:
    """§2.2: what a refresh or code exchange may have: the ``resources`` asked for, all of
    them within the grant; if none are asked for, the whole grant. A resource the operator
    has since removed from ``AUTH_RESOURCES``, or from the client's list, is no longer part of
    any grant: asked for, it is refused; not asked for, the rest of the grant is given, and
    when nothing of the grant is left, ``invalid_target`` (the refresh token is not spent)."""
    mine = permitted(client, settings)
    still = [r for r in (granted.split() or [settings.audience]) if r in mine]
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
