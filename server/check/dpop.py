"""Checks of DPoP (RFC 9449) at the token endpoint, for a server that advertises it.

``dpop-discovery`` reads ``dpop_signing_alg_values_supported`` (§5.1) in the discovery
documents: asymmetric algorithms only, never ``none`` (§4.2). Without it the server does not
do DPoP, and every DPoP check is skipped with that reason. The others use the configured
client's client_credentials grant (they need ``client-credentials``) and an ephemeral EC P-256
key made for this run: a request with a fresh proof gets a token bound to that key
(``dpop-bound-token``), and the same proof sent again (``dpop-proof-replay``) or one made for
another URI (``dpop-proof-wrong-htu``) is refused with ``invalid_dpop_proof``.

A server that answers ``use_dpop_nonce`` with a ``DPoP-Nonce`` header (§8) gets one retry,
with a proof carrying that nonce; the newest nonce it sends is used for the next proof.
Nothing is sent to a resource (``check`` calls none).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
from joserfc import jws
from joserfc.jwk import ECKey

from .context import INTROSPECT_PATH, TOKEN_PATH, Context, check
from .metadata import DISCOVERY_PATHS
from .outcome import CheckFailed, CheckSkipped
from .parse import describe, error_code, expect_error, parse_json, short, unverified_part

ALGS = "dpop_signing_alg_values_supported"
#: What this check signs its proofs with (and the curve of its key).
PROOF_ALG = "ES256"
#: The MAC algorithms of the JWS registry (RFC 7518 §3.1): a proof must not use them (§4.2).
MAC_ALGS = ("HS256", "HS384", "HS512")
USE_DPOP_NONCE = "use_dpop_nonce"
INVALID_DPOP_PROOF = "invalid_dpop_proof"
#: A ``DPoP-Nonce`` longer than this is not put into a proof (nor is an empty one).
MAX_NONCE_LENGTH = 1024
CLIENT_CREDENTIALS = {"grant_type": "client_credentials"}


@check("dpop-discovery")
async def check_dpop_discovery(ctx: Context) -> None:
    """RFC 9449 §5.1: both documents list the proof algorithms, a non-empty list of names,
    asymmetric only: never ``none`` nor a MAC (§4.2). Skipped when neither lists any."""
    ctx.need("discovery")
    listed = {path: doc[ALGS] for path, doc in ctx.documents.items() if ALGS in doc}
    if not listed:
        raise CheckSkipped(f"the server does not advertise DPoP (no {ALGS} in discovery)")
    for path in DISCOVERY_PATHS:
        if path not in listed:
            raise CheckFailed(f"{path}: no {ALGS}, though the other document lists it")
    for path, algs in listed.items():
        if not isinstance(algs, list) or not algs or not all(isinstance(a, str) for a in algs):
            raise CheckFailed(f"{path}: {ALGS} is not a list of algorithm names")
        if any(alg.lower() == "none" for alg in algs):
            raise CheckFailed(f"{path}: {ALGS} lists none")
        symmetric = [alg for alg in algs if alg.upper() in MAC_ALGS]
        if symmetric:
            raise CheckFailed(f"{path}: {ALGS} lists the symmetric {short(symmetric[0])}")


@check("dpop-bound-token")
async def check_dpop_bound_token(ctx: Context) -> None:
    """RFC 9449 §5, §6.1: a client_credentials request with a fresh proof gets
    ``token_type`` DPoP and an access token whose ``cnf.jkt`` is the RFC 7638 thumbprint of
    the proof's key."""
    key = dpop_key(ctx)
    what = "client_credentials grant with a DPoP proof"
    sent: list[tuple[str, dict[str, Any]]] = []

    def build(nonce: str | None) -> str:
        sent.append(proof(key, ctx.url(TOKEN_PATH), nonce))
        return sent[-1][0]

    response = await send(ctx, build(ctx.dpop_nonce), build, what)
    body = ctx.token_body(response, what, scheme="DPoP")
    ctx.dpop_proof, ctx.dpop_claims = sent[-1]
    claims = unverified_part(str(body["access_token"]), 1, f"{what}: the access token")
    cnf = claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    if jkt is None:
        raise CheckFailed(f"{what}: the access token has no cnf.jkt (it is not bound)")
    if jkt != key.thumbprint():
        raise CheckFailed(
            f"{what}: cnf.jkt is {short(jkt)}, not the RFC 7638 thumbprint of the proof key"
        )


@check("dpop-proof-replay")
async def check_dpop_proof_replay(ctx: Context) -> None:
    """RFC 9449 §11.1: the proof ``dpop-bound-token`` was granted for, sent again (its
    ``jti`` once more), is 400 ``invalid_dpop_proof``. A server that first wants a newer
    nonce gets the same ``jti`` again under that nonce."""
    ctx.need("dpop-bound-token")
    key, first, claims = ctx.dpop_key, ctx.dpop_proof, ctx.dpop_claims
    assert key is not None and first is not None and claims is not None

    def same_jti(nonce: str | None) -> str:
        return sign(key, {**claims, "nonce": nonce})

    what = "a replayed DPoP proof (same jti)"
    response = await send(ctx, first, same_jti, what)
    refused(ctx, response, what)


@check("dpop-proof-wrong-htu")
async def check_dpop_proof_wrong_htu(ctx: Context) -> None:
    """RFC 9449 §4.3 (check 9): a fresh proof whose ``htu`` is another endpoint of the
    server (the introspection endpoint) is 400 ``invalid_dpop_proof`` at the token endpoint."""
    key = dpop_key(ctx)
    other = ctx.url(INTROSPECT_PATH)

    def build(nonce: str | None) -> str:
        return proof(key, other, nonce)[0]

    what = f"a DPoP proof with htu {INTROSPECT_PATH}"
    response = await send(ctx, build(ctx.dpop_nonce), build, what)
    refused(ctx, response, what)


def dpop_key(ctx: Context) -> ECKey:
    """The run's proof key, once DPoP is advertised with ``PROOF_ALG`` and the client has
    the client_credentials grant; else skipped (or failed) as those checks were."""
    ctx.need("client-credentials")
    ctx.need("dpop-discovery")
    algs = next(iter(ctx.documents.values()))[ALGS]
    if PROOF_ALG not in algs:
        raise CheckSkipped(f"{PROOF_ALG} (what check signs proofs with) is not in {ALGS}")
    if ctx.dpop_key is None:
        ctx.dpop_key = ECKey.generate_key("P-256")
    return ctx.dpop_key


def proof(key: ECKey, htu: str, nonce: str | None) -> tuple[str, dict[str, Any]]:
    """A fresh proof (a new ``jti``, ``iat`` now) for a POST to ``htu``, and its claims."""
    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(24),
        "htm": "POST",
        "htu": htu,
        "iat": int(time.time()),
        "nonce": nonce,
    }
    return sign(key, claims), claims


def sign(key: ECKey, claims: dict[str, Any]) -> str:
    """RFC 9449 §4.2: ``typ`` dpop+jwt, the public key in ``jwk``; a ``None`` nonce is left out."""
    header = {"typ": "dpop+jwt", "alg": PROOF_ALG, "jwk": key.as_dict(private=False)}
    payload = {name: value for name, value in claims.items() if value is not None}
    body = json.dumps(payload, separators=(",", ":")).encode()
    return jws.serialize_compact(header, body, key, algorithms=[PROOF_ALG])


async def send(
    ctx: Context, first: str, retry: Callable[[str | None], str], what: str
) -> httpx.Response:
    """POST the client_credentials grant with the proof ``first``; on 400 ``use_dpop_nonce``
    once more with ``retry(nonce)`` (RFC 9449 §8). The nonce the server sends is kept."""
    response = await ctx.post(TOKEN_PATH, CLIENT_CREDENTIALS, headers={"DPoP": first})
    if response.status_code != 400 or error_code(response) != USE_DPOP_NONCE:
        keep_nonce(ctx, response)
        return response
    if not keep_nonce(ctx, response):
        raise CheckFailed(f"{what}: HTTP 400 {USE_DPOP_NONCE} without a usable DPoP-Nonce header")
    response = await ctx.post(
        TOKEN_PATH, CLIENT_CREDENTIALS, headers={"DPoP": retry(ctx.dpop_nonce)}
    )
    keep_nonce(ctx, response)
    if response.status_code == 400 and error_code(response) == USE_DPOP_NONCE:
        raise CheckFailed(f"{what}: HTTP 400 {USE_DPOP_NONCE} again, with the nonce it sent")
    return response


def keep_nonce(ctx: Context, response: httpx.Response) -> bool:
    """Remember the response's ``DPoP-Nonce`` (§8.2: any response may carry the next one)."""
    nonce = response.headers.get("dpop-nonce", "").strip()
    if not nonce or len(nonce) > MAX_NONCE_LENGTH:
        return False
    ctx.dpop_nonce = nonce
    return True


def refused(ctx: Context, response: httpx.Response, what: str) -> None:
    """``response`` is 400 ``invalid_dpop_proof``; a token issued instead is a failure (and
    never printed)."""
    if response.status_code == 200:
        body = parse_json(response)
        if isinstance(body, dict):
            ctx.sensitive.update(
                str(body[name]) for name in ("access_token", "refresh_token") if name in body
            )
        raise CheckFailed(f"{what}: accepted ({describe(response)}, a token was issued)")
    expect_error(response, 400, INVALID_DPOP_PROOF, what)
