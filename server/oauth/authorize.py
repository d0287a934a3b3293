"""The authorization endpoint (RFC 6749 §4.1, OpenID Connect Core §3.1) and its consent page.

``GET|POST /oauth2/authorize`` validates the request with Authlib's ``AuthorizationCodeGrant``
(client, exact redirect URI, response type, scope, PKCE), then decides:
- not signed in, or ``prompt=login``, or a sign-in older than ``max_age`` → the sign-in page
  (the full sign-in: password and, where the policy asks, the second step), which comes back
  here; ``prompt=none`` → ``login_required`` to the client instead;
- signed in, but weaker than ``acr_values`` asks and one of the person's factors can reach it,
  or ``AUTH_MFA=required`` and the sign-in had one factor → the step-up (``/login/step-up``:
  a second factor, or enrolment for someone without one), which comes back here;
  ``prompt=none`` → ``login_required`` (``interaction_required`` when enrolment is needed);
- consent needed (client not first-party and scope not yet allowed, or ``prompt=consent``)
  → the consent page; ``prompt=none`` → ``consent_required``;
- otherwise a code, single use, ``AUTH_AUTHORIZATION_CODE_TTL`` (60 s), bound to client,
  redirect URI, PKCE challenge, nonce and the browser session.

Errors go back to the client only once its redirect URI is known to be registered (Authlib sets
``error.redirect_uri`` only then); otherwise the error page shows them (§4.1.2.1). Every
response to the client carries ``iss`` (RFC 9207). At the token endpoint the code is claimed
by one conditional UPDATE; a second use revokes the family the first one started (§4.1.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.errors import AccessDeniedError, InvalidRequestError, OAuth2Error
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.responses import RedirectResponse, Response

from .. import documents, mfa
from .. import factors as factor_store
from ..config import Settings
from ..deps import AppState, StateDep
from ..forms import FormError, parse_form, read_form, repeated
from ..models import Client, Consent
from ..observability import audit
from ..ratelimit import Verdict
from ..web.browser import Csrf, SignedIn, current_session, error_page, posted_form, render
from . import par, resource_names
from .authorization_request import check_request
from .grants import CodeGrant
from .requests import FormRequest
from .server import TokenServer

router = APIRouter()

SCOPE_DESCRIPTIONS = {
    "openid": "Confirm who you are (your account id)",
    "profile": "See your name and username",
    "email": "See your email address",
    "offline_access": "Stay signed in when you are away",
    "api": "Use the API on your behalf",
    # The account API (/api/v1/me…): never implied by a sign-in, named in full on consent.
    "account": "Read and change your profile and email address, and end your sign-ins",
}
MAX_AUTHORIZE_QUERY = 4096
#: What the error page tells a person, before the technical detail for the developers.
PEOPLE_ERRORS = {
    "invalid_client": "The application that sent you here is not registered with this server.",
    "invalid_request": "The application sent you here with a broken request.",
    "unsupported_response_type": "The application asked for a kind of sign-in we do not offer.",
    "invalid_scope": "The application asked for access it is not allowed to ask for.",
    "invalid_target": "The application asked for a service it is not allowed to use.",
    "unauthorized_client": "The application is not allowed to use this kind of sign-in.",
    "invalid_request_uri": "This sign-in was already used. Go back to the application and "
    "start again.",
}


# -- the endpoint -------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the synchronous part decided; the route turns it into a response."""

    location: str | None = None  # redirect to the client
    error: OAuth2Error | None = None  # show on the error page
    login: bool = False  # send to the sign-in page
    step_up: bool = False  # send to the step-up (a stronger sign-in of the same person)
    level: str = "2"  # ... to reach this acr (``mfa.target_level``)
    consent: dict[str, Any] = field(default_factory=dict)  # show the consent page
    issued: bool = False  # the redirect carries a new code


class PushedRequestUsedError(OAuth2Error):  # type: ignore[misc]
    """RFC 9101 §7 ``invalid_request_uri``: the pushed request already ended."""

    error = "invalid_request_uri"


def provenance(client: Client) -> str | None:
    """What the consent page says of who vouches for the client's name: nobody, for a client
    that registered itself (RFC 7591) or is described by its own metadata document, which is
    named by the host serving it (people can judge a host; a name anyone may choose)."""
    if client.origin == "registration":
        return "This application registered itself: its name has not been checked."
    if client.origin == "document":
        host = urlsplit(client.client_id).hostname or client.client_id
        return f"This application is described by {host}: its name has not been checked."
    return None


def _with_iss(location: str, issuer: str) -> str:
    # RFC 9207 §2: iss in every authorization response, success or error.
    return str(add_params_to_uri(location, [("iss", issuer)]))


def _redirect_error(error: OAuth2Error, issuer: str) -> Outcome:
    if error.redirect_uri:
        _, _, headers = error()
        return Outcome(location=_with_iss(dict(headers)["Location"], issuer))
    return Outcome(error=error)


def needs_factors(settings: Settings, who: SignedIn | None, params: dict[str, str]) -> bool:
    """Whether ``decide`` needs the person's factors (``step_up``): loaded only then."""
    return who is not None and (settings.mfa == "required" or bool(params.get("acr_values")))


def step_up(
    settings: Settings, who: SignedIn, have: mfa.Factors | None, acr_values: str
) -> tuple[str, str] | None:
    """Why the signed-in person must prove more before a code: ``"factor"`` (a second factor
    they have), ``"enrol"`` (``AUTH_MFA=required`` and they have none), or ``None``; with the
    level the step-up must reach (the step-up then offers only factors that reach it).

    OpenID Connect Core §3.1.2.1: ``acr_values`` is space-separated, in order of preference,
    and voluntary (§5.5.1.1): asked only when one of their factors can reach a requested level
    (``mfa.step_up_helps``), unknown values ignored; otherwise the code says (``acr``) what the
    sign-in reached. Once the step-up is done (or cannot help) this is ``None``: no loop."""
    amr = who.session.amr
    if have is None:
        return None
    requested = acr_values.split()
    helps = mfa.step_up_helps(amr, have, requested)
    level = mfa.target_level(requested) if helps else "2"
    if settings.mfa == "required" and not mfa.is_multi_factor(amr):
        return ("factor" if have.any else "enrol"), level
    if helps:
        return "factor", level
    return None


def decide(
    server: TokenServer,
    request: FormRequest,
    who: SignedIn | None,
    decision: str | None,
    *,
    pushed: bool = False,
    factors: mfa.Factors | None = None,
) -> Outcome:
    """``pushed``: the parameters came from /oauth2/par (RFC 9126 §4); ``factors``: the
    signed-in person's (``needs_factors``), else ``None``."""
    issuer = server.settings.issuer
    prompts = set(request.form.get("prompt", "").split())
    user = who.user if who is not None else None
    try:
        grant: CodeGrant = check_request(server, request)
    except OAuth2Error as error:
        return _redirect_error(error, issuer)
    request.user = user
    redirect_uri = grant.redirect_uri
    state = request.form.get("state")

    def fail(error: OAuth2Error) -> Outcome:
        error.redirect_uri, error.state = redirect_uri, state
        return _redirect_error(error, issuer)

    if not pushed and par.required(server, request.client):
        # RFC 9126 §5 / §6 (SPEC.md: invalid_request, to the client's redirect URI).
        return fail(
            InvalidRequestError(
                "This client must push its authorization requests to /oauth2/par first."
            )
        )
    max_age = request.form.get("max_age")
    # OpenID Connect Core §3.1.2.1: max_age asks for a sign-in at most that old, and
    # max_age=0 is prompt=login (so also within the second of the last sign-in).
    too_old = (
        who is not None
        and max_age is not None
        and (int(max_age) == 0 or request.issued_at - who.session.auth_time > int(max_age))
    )
    if who is None or too_old or ("login" in prompts and decision is None):
        if "none" in prompts:
            return fail(OAuth2Error(error="login_required", description="Sign-in required."))
        return Outcome(login=True)
    # Authentication before consent (OpenID Connect Core §3.1.2.3, then §3.1.2.4).
    stronger = step_up(server.settings, who, factors, request.form.get("acr_values", ""))
    if stronger is not None:
        reason, level = stronger
        if "none" in prompts:
            # OpenID Connect Core §3.1.2.6: a second factor is End-User authentication
            # (login_required); enrolling one is interaction of another kind
            # (interaction_required).
            if reason == "enrol":
                return fail(
                    OAuth2Error(
                        error="interaction_required",
                        description="A second sign-in method must be set up first.",
                    )
                )
            return fail(
                OAuth2Error(error="login_required", description="A stronger sign-in is required.")
            )
        return Outcome(step_up=True, level=level)
    client: Client = request.client
    scope: str = request.scope
    db = request.db
    assert isinstance(db, Session)  # the authorization endpoint runs on the ORM session
    consent = db.get(Consent, (who.user.id, client.client_id))
    allowed = set(consent.scope.split()) if consent is not None else set()
    needs_consent = not client.is_first_party and (
        "consent" in prompts or not set(scope.split()) <= allowed
    )
    if decision == "deny":
        return fail(AccessDeniedError("The request was denied."))
    if needs_consent and decision != "allow":
        if "none" in prompts:
            return fail(OAuth2Error(error="consent_required", description="Consent required."))
        return Outcome(
            consent={
                "client_name": client.name,
                "scope": scope.split(),
                "resources": list(request.resources),
                "provenance": provenance(client),
            }
        )
    if needs_consent:
        if consent is None:
            db.add(Consent(user_id=who.user.id, client_id=client.client_id, scope=scope))
        else:
            consent.scope = " ".join(dict.fromkeys([*consent.scope.split(), *scope.split()]))
            consent.updated_at = request.issued_at
        audit("consent.granted", user_id=who.user.id, client_id=client.client_id, scope=scope)
    request.browser_session_id = who.session.id
    request.auth_time = who.session.auth_time
    request.amr = mfa.session_amr(who.session.amr)
    _, _, headers = grant.create_authorization_response(redirect_uri, who.user)
    audit("code.issued", client_id=client.client_id, user_id=who.user.id)
    return Outcome(location=_with_iss(dict(headers)["Location"], issuer), issued=True)


async def handle(
    request: Request, state: AppState, params: dict[str, str], decision: str | None
) -> Response:
    """``params``: the request as the browser sent it (URL or consent form)."""
    if "request_uri" not in params:
        return await _handle(request, state, params, params, decision, None)
    # RFC 9126 §4: a pushed request; its parameters are the pushed ones only.
    opened = await par.open_pushed(request, state, params)
    if isinstance(opened, Response):
        return opened
    used = par.effective(opened.params, params)
    response = await _handle(request, state, params, used, decision, opened.request_uri_hash)
    return opened.attach(response, state)


async def _handle(
    request: Request,
    state: AppState,
    sent: dict[str, str],
    params: dict[str, str],
    decision: str | None,
    pushed: str | None,
) -> Response:
    """``sent``: what the browser sent, which the sign-in and consent pages send back;
    ``params``: the request's parameters; ``pushed``: the hash of its ``request_uri``."""
    settings = state.settings
    query = urlencode(repeated(params))
    oauth_request = FormRequest("GET", settings.issuer + "/oauth2/authorize?" + query, {}, params)
    limiter = state.limiter
    # The client, for Authlib's ``query_client`` (server/clients.py); before the session is
    # opened, since a SQLite process has one connection.
    if client_id := params.get("client_id"):
        admitted = await documents.admit(state, request, client_id)
        if not admitted.allowed:
            return _too_many_documents(admitted)
        await state.clients.get(client_id)
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        # Codes issued per browser session (``AUTH_RATE_LIMIT_AUTHORIZE``): each is a row, so
        # one signed-in browser must not mint them without limit. Checked before, counted
        # only when a code was issued.
        codes = []
        if who is not None:
            codes = [(limiter.authorize_session, "authorize-session", who.session.id)]
        verdict = await limiter.check(codes)
        if not verdict.allowed:
            return _too_many_codes(verdict)
        server: TokenServer = request.app.state.oauth
        have = None
        if who is not None and needs_factors(settings, who, params):
            have = await factor_store.load(db, who.user.id, settings)

        def on(session: Session) -> Outcome:
            oauth_request.db = session
            outcome = decide(
                server, oauth_request, who, decision, pushed=pushed is not None, factors=have
            )
            if (
                pushed is not None
                and outcome.location is not None
                and not par.spend(session, pushed, oauth_request.issued_at)
            ):
                # Another tab of this browser ended the pushed request first: nothing of
                # this answer is kept (its code would never reach the client).
                session.rollback()
                return Outcome(error=PushedRequestUsedError())
            return outcome

        outcome: Outcome = await db.run_sync(on)
        await db.commit()
    if outcome.issued:
        await limiter.count(codes)
    # After a POST (the consent form) the browser must follow with a GET: 303.
    status = 303 if request.method == "POST" else 302
    if outcome.location is not None:
        return RedirectResponse(outcome.location, status_code=status)
    if outcome.error is not None:
        error = outcome.error
        explanation = PEOPLE_ERRORS.get(
            error.error, "The application sent a request we cannot use."
        )
        # Fixed text per error code: Authlib's descriptions quote request values, which must
        # not be repeated on this origin (content spoofing); the code is for the developers.
        return error_page(
            400,
            "This sign-in request is not valid",
            f"{explanation} Tell the application's developers: {error.error}.",
        )
    if outcome.login:
        # The sign-in about to happen satisfies prompt=login and max_age: not asked again.
        # A pushed request's own parameters cannot change: the URL narrows its prompt
        # (``par.effective``).
        prompts = [p for p in params.get("prompt", "").split() if p != "login"]
        if pushed is not None:
            again = {k: sent[k] for k in ("client_id", "request_uri")}
            again["prompt"] = " ".join(prompts)
        else:
            again = {k: v for k, v in params.items() if k not in ("prompt", "max_age")}
            if prompts:
                again["prompt"] = " ".join(prompts)
        target = "/oauth2/authorize?" + urlencode(repeated(again))
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=status)
    if outcome.step_up:
        # The request comes back as it is: the step-up starts a new session (a new
        # ``auth_time``), so ``max_age`` holds, and its ``amr`` now meets what was asked.
        # A pushed request is named again by its ``request_uri`` (with the URL's narrowed
        # ``prompt``, as the sign-in redirect leaves it).
        keep = ("client_id", "request_uri", "prompt") if pushed is not None else tuple(sent)
        again = {k: sent[k] for k in keep if k in sent}
        target = "/oauth2/authorize?" + urlencode(repeated(again))
        return RedirectResponse(
            "/login/step-up?" + urlencode({"next": target, "acr": outcome.level}),
            status_code=status,
        )
    # RFC 8707: the services (APIs) the access is for, by name where one is known
    # (``resource_names``: AUTH_RESOURCES or the resource's RFC 9728 metadata), always with
    # the URI as asked for; none: ours.
    resources = await resource_names.named(state, outcome.consent["resources"])
    csrf = Csrf.of(request, settings)
    return render(
        "consent.html",
        csrf=csrf,
        settings=settings,
        title="Allow access",
        user=who.user if who is not None else None,
        client_name=outcome.consent["client_name"],
        scopes=[
            {"name": s, "description": SCOPE_DESCRIPTIONS.get(s, f"Use “{s}”")}
            for s in outcome.consent["scope"]
        ],
        resources=resources,
        provenance=outcome.consent["provenance"],
        # A plain request's prompt was answered by showing this page; a pushed request's
        # URL prompt only narrows the pushed one (``par.effective``), so it stays.
        params=[(k, v) for k, v in repeated(sent) if pushed is not None or k != "prompt"],
    )


def _too_many_codes(verdict: Verdict) -> Response:
    """429 with ``Retry-After`` (RFC 6585 §4): shown by the browser, never sent to the client
    (its redirect URI has not been checked yet)."""
    audit("rate_limit.exceeded", endpoint="authorize", scope=verdict.scope)
    response = error_page(
        429,
        "Too many sign-in requests",
        f"This browser asked for too many sign-ins. Wait {verdict.retry_after} seconds "
        "and try again.",
    )
    response.headers["Retry-After"] = str(verdict.retry_after)
    return response


def _too_many_documents(verdict: Verdict) -> Response:
    """429: this address made the server fetch too many client metadata documents."""
    response = error_page(
        429,
        "Too many new applications",
        f"Too many sign-ins with applications new to this server came from your network. "
        f"Wait {verdict.retry_after} seconds and try again.",
    )
    response.headers["Retry-After"] = str(verdict.retry_after)
    return response


def _bad_request(message: str, status: int = 400) -> Response:
    return error_page(status, "This sign-in request is not valid", message)


@router.get("/oauth2/authorize")
async def authorize(request: Request, state: StateDep) -> Response:
    raw = request.url.query
    if len(raw) > MAX_AUTHORIZE_QUERY:
        return _bad_request("The request is too long.")
    try:
        params = parse_form(raw)
    except FormError as error:
        return _bad_request(str(error))
    return await handle(request, state, params, decision=None)


@router.post("/oauth2/authorize")
async def authorize_post(request: Request, state: StateDep) -> Response:
    # OpenID Connect Core §3.1.2.1: the endpoint accepts POST with a form body too.
    try:
        params = await read_form(request, MAX_AUTHORIZE_QUERY)
    except FormError as error:
        return _bad_request(str(error), error.status)
    return await handle(request, state, params, decision=None)


@router.post("/consent")
async def consent(request: Request, state: StateDep) -> Response:
    posted = await posted_form(request, state.settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    decision = form.pop("decision", None)
    if decision not in ("allow", "deny"):
        return _bad_request("Choose Allow or Deny.")
    return await handle(request, state, form, decision=decision)
