"""`user_app_id` → the datasetd app a V2 call acts on.

datasetd apps are the namespace of datasets, inputs, annotations and concepts; a key
belongs to one app. `user_app_id.user_id` is accepted as any value (datasetd has no users
yet; Clarifai clients send `me` or their user id) and `app_id` must be the key's app, or
empty (an app-scoped key implies its app, as in Clarifai's own tests)."""

from __future__ import annotations

from typing import Protocol

from service.api.interceptors import current_principal
from service.domain.errors import Unauthenticated


class UserAppScoped(Protocol):
    @property
    def user_app_id(self) -> object: ...


def app_of(request: UserAppScoped) -> str:
    """The datasetd app id of the request."""
    principal = current_principal()
    app_id: str = getattr(request.user_app_id, "app_id", "")
    if not app_id:
        return principal.app_id
    if app_id != principal.app_id:
        raise Unauthenticated(
            f"user_app_id.app_id {app_id!r}: the key does not belong to this app",
            reason="KEY_APP_MISMATCH",
        )
    return app_id
