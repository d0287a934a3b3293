"""The admin API's clients: register, list, show, change, rotate the secret, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from ... import manage
from ...config import Env
from ...deps import AppState, StateDep
from ...observability import audit
from ..auth import AdminDep, ApiError, client_refusals
from .pagination import CURSOR_ERRORS, Cursor, Limit, cursor_key, page
from .schemas import (
    ChangedClient,
    ClientChange,
    ClientOut,
    ClientPage,
    ClientSecret,
    CreatedClient,
    NewClient,
)

router = APIRouter()

ClientId = Annotated[str, Path(min_length=1, max_length=100, pattern=manage.CLIENT_ID_RE.pattern)]
CLIENT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such client (`not_found`)"},
}
CLIENT_INPUT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "`invalid_client_metadata` (e.g. client_credentials for a public "
        "client) or `invalid_redirect_uri` (https only in production, exact strings)"
    },
}


def _https_only(state: AppState) -> bool:
    return state.settings.env is Env.production


@router.post(
    "/clients",
    status_code=201,
    responses={**CLIENT_INPUT_ERRORS, 409: {"description": "Client id taken (`client_exists`)"}},
)
async def create_client(new: NewClient, admin: AdminDep, state: StateDep) -> CreatedClient:
    """Register a client. Its secret is in this answer and nowhere else, ever."""
    with client_refusals():
        created = await manage.create_client(
            admin.db,
            client_id=new.client_id,
            public=new.public,
            admin=new.admin,
            resource_server=new.resource_server,
            first_party=new.first_party,
            grants=list(new.grant_types),
            scope=new.scope,
            redirect_uris=new.redirect_uris,
            post_logout_redirect_uris=new.post_logout_redirect_uris,
            name=new.name,
            https_only=_https_only(state),
            refresh_retry_window=new.refresh_retry_window,
            auth_method=new.token_endpoint_auth_method,
            jwks=None if new.jwks is None else new.jwks.model_dump(),
            jwks_uri=new.jwks_uri,
            resources=new.resources,
            dpop_bound=new.dpop_bound_access_tokens,
            require_par=new.require_pushed_authorization_requests,
            settings=state.settings,
            actor=admin.client_id,
        )
        await admin.commit()
    return CreatedClient(**manage.client_view(created.client), client_secret=created.secret)


@router.get("/clients", responses=CURSOR_ERRORS)
async def list_clients(
    admin: AdminDep, state: StateDep, limit: Limit = 50, cursor: Cursor = None
) -> ClientPage:
    after = cursor_key(state.settings.secret_key, "clients", cursor)
    rows = await manage.page_clients(admin.db, after=after, limit=limit + 1)
    clients, next_cursor = page(state.settings.secret_key, "clients", rows, limit, "client_id")
    audit("admin.clients_listed", actor_client_id=admin.client_id, count=len(clients))
    return ClientPage(
        items=[ClientOut(**manage.client_view(c)) for c in clients], next_cursor=next_cursor
    )


@router.get("/clients/{client_id}", responses=CLIENT_ERRORS)
async def show_client(client_id: ClientId, admin: AdminDep) -> ClientOut:
    with client_refusals():
        client = await manage.get_client(admin.db, client_id)
    audit("admin.client_viewed", actor_client_id=admin.client_id, client_id=client_id)
    return ClientOut(**manage.client_view(client))


@router.patch("/clients/{client_id}", responses={**CLIENT_ERRORS, **CLIENT_INPUT_ERRORS})
async def update_client(
    client_id: ClientId, change: ClientChange, admin: AdminDep, state: StateDep
) -> ChangedClient:
    """Change the name, consent, grants, scopes, URIs, resources, keys, authentication
    method, DPoP binding or PAR requirement; sign-ins already made keep only the scopes the
    client still has when they next refresh. A change of method that needs a new secret
    answers it, once."""
    with client_refusals():
        updated = await manage.update_client(
            admin.db,
            client_id,
            change.model_dump(include=change.model_fields_set),
            https_only=_https_only(state),
            settings=state.settings,
            actor=admin.client_id,
        )
        await admin.commit()
    return ChangedClient(**manage.client_view(updated.client), client_secret=updated.secret)


@router.post(
    "/clients/{client_id}/secret",
    responses={**CLIENT_ERRORS, 409: {"description": "A public client (`public_client`)"}},
)
async def rotate_secret(client_id: ClientId, admin: AdminDep, state: StateDep) -> ClientSecret:
    """A new secret, shown once; the old one stops working at once. Tokens already issued
    stay valid until they expire. A private_key_jwt client has none (400: it changes its
    keys instead)."""
    with client_refusals():
        secret = await manage.rotate_client_secret(
            admin.db, client_id, settings=state.settings, actor=admin.client_id
        )
        await admin.commit()
    return ClientSecret(client_id=client_id, client_secret=secret)


@router.delete(
    "/clients/{client_id}",
    status_code=204,
    responses={
        **CLIENT_ERRORS,
        409: {"description": "The acting client itself (`cannot_delete_self`)"},
    },
)
async def delete_client(client_id: ClientId, admin: AdminDep) -> Response:
    """Delete the client with its sign-ins; its tokens stop working at once."""
    if client_id == admin.client_id:
        # Deleting the last admin client would leave only the CLI; the CLI can do it.
        raise ApiError(409, "cannot_delete_self", "A client cannot delete itself here.")
    with client_refusals():
        await manage.delete_client(admin.db, client_id, actor=admin.client_id)
        await admin.commit()
    return Response(status_code=204)
