"""Helpers of the V2 tests."""

from __future__ import annotations

from clarifai_grpc.grpc.api import resources_pb2

from tests.conftest import Caller


def scope(caller: Caller) -> resources_pb2.UserAppIDSet:
    """The caller's app, with the user id Clarifai clients send most."""
    return resources_pb2.UserAppIDSet(user_id="me", app_id=caller.app_id)
