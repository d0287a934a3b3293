"""The admin API's signing keys: the manifest, rotation and pruning, as the CLI's ``keys``
commands do."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from ...deps import AppState, StateDep
from ...keys import KeyInfo, RotationTooSoonError
from ...keys_db import KeyStoreConflictError
from ...observability import audit, log
from ..auth import AdminDep, ApiError
from .schemas import KeyOut, KeyRotation, Keys, KeysPruned

router = APIRouter()


def _keys_out(infos: list[KeyInfo]) -> Keys:
    return Keys(keys=[KeyOut(**asdict(info)) for info in infos])


@router.get("/keys")
async def list_keys(admin: AdminDep, state: StateDep) -> Keys:
    """The signing keys' manifest (never a private key): the JWKS publishes next, current and
    retired keys; ``current`` signs."""
    await admin.release()  # no transaction of the request is held while the keys are read
    infos = await state.keys.alist()
    audit("admin.keys_listed", actor_client_id=admin.client_id)
    return _keys_out(infos)


@router.post(
    "/keys/rotate",
    responses={
        409: {
            "description": "The next key is too new to sign (`rotation_too_soon`), or the "
            "database store's keys are sealed under another encryption key "
            "(`key_store_conflict`)"
        }
    },
)
async def rotate_keys(
    admin: AdminDep, state: StateDep, rotation: KeyRotation | None = None
) -> Keys:
    """next → current, current → retired, and a new next key, as ``keys rotate`` does. Every
    replica sharing the keys directory picks the change up within AUTH_KEY_RELOAD_INTERVAL."""
    await admin.release()  # no transaction of the request is held while the keys change
    min_age = 0 if rotation is not None and rotation.force else state.settings.jwks_max_age
    try:
        infos = await state.keys.arotate(min_next_age=min_age)
    except RotationTooSoonError:
        detail = (
            f"The next key was published less than the JWKS max-age ({min_age} s) ago, so "
            'cached JWKS may not hold it yet: retry later, or send {"force": true}.'
        )
        raise ApiError(409, "rotation_too_soon", detail) from None
    except KeyStoreConflictError as exc:
        # The database store's keys are sealed under another encryption key than this
        # replica's: a key sealed now would not open on the others (README, "rewrap").
        raise ApiError(409, "key_store_conflict", str(exc)) from None
    current = next(info.kid for info in infos if info.state == "current")
    # Recorded first: the rotation is committed, whatever the reload below meets.
    audit("key.rotated", kid=current, actor_client_id=admin.client_id, via="admin_api")
    await _reload(state)  # this replica signs with it at once
    return _keys_out(infos)


async def _reload(state: AppState) -> None:
    """Reload after a committed change; a failure is the reloader's to report (``/readyz``,
    ``keys_reload_failing``), not a 500 that would invite the operator to change it again."""
    try:
        await state.keys.areload()
    except Exception as exc:
        log.error("keys.reload_failed", error=str(exc))


@router.post("/keys/prune")
async def prune_keys(admin: AdminDep, state: StateDep) -> KeysPruned:
    """Remove retired keys whose every token has expired, as ``keys prune`` does."""
    await admin.release()  # no transaction of the request is held while the keys change
    ttl = state.settings.access_token_ttl
    pruned = await state.keys.aprune(max_token_lifetime=ttl)
    audit(
        "key.pruned",
        removed=pruned.removed,
        orphans=pruned.orphans,
        actor_client_id=admin.client_id,
        via="admin_api",
    )
    await _reload(state)
    return KeysPruned(removed=pruned.removed, kept=pruned.kept, orphans=pruned.orphans)
