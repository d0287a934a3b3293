"""Pushed authorization requests (RFC 9126), for a server that advertises them.

``par-refuses-unauthenticated``: the ``pushed_authorization_request_endpoint`` of the discovery
documents stores nothing for a client that does not authenticate (§2.1: the endpoint
authenticates clients as the token endpoint does): a push naming a client id the server cannot
know is 401 ``invalid_client`` (RFC 6749 §5.2), never a ``request_uri``. Without the member
the server does not do PAR and the check is skipped.
"""

from __future__ import annotations

import secrets

from .context import Context, check
from .outcome import CheckFailed, CheckSkipped
from .parse import describe, error_code

ENDPOINT = "pushed_authorization_request_endpoint"


@check("par-refuses-unauthenticated")
async def check_par_refuses_unauthenticated(ctx: Context) -> None:
    ctx.need("discovery")
    endpoint = next(
        (doc[ENDPOINT] for doc in ctx.documents.values() if isinstance(doc.get(ENDPOINT), str)),
        None,
    )
    if endpoint is None:
        raise CheckSkipped(f"the server does not advertise PAR (no {ENDPOINT} in discovery)")
    # A client id nobody registered (and not a URL, so no metadata document is fetched).
    client_id = "check-unknown-" + secrets.token_hex(8)
    form = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": "https://check.invalid/cb",
        "scope": "openid",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
    }
    response = await ctx.http.post(endpoint, data=form)
    if response.status_code == 401 and error_code(response) == "invalid_client":
        return
    what = f"POST {ENDPOINT} for an unknown client: {describe(response)}"
    if 200 <= response.status_code < 300:
        raise CheckFailed(f"{what}, a request was stored for a client nobody authenticated")
    raise CheckFailed(f"{what}, expected 401 invalid_client")
