"""Database.after_commit against the real PostgreSQL: a hook runs once the outermost
transaction commits, never when it (or the savepoint it was registered in) rolls back."""

from __future__ import annotations

import pytest

from service.storage.db import Database


class Boom(Exception):
    pass


async def test_a_hook_waits_for_the_outermost_commit(db: Database) -> None:
    ran: list[str] = []
    async with db.transaction():
        async with db.transaction():
            db.after_commit(lambda: ran.append("inner"))
            assert ran == []
        db.after_commit(lambda: ran.append("outer"))
        # Visible to the hook means committed: nothing has run inside the transaction.
        assert ran == []
    assert ran == ["inner", "outer"]


async def test_a_rollback_drops_its_hooks(db: Database) -> None:
    ran: list[str] = []
    with pytest.raises(Boom):
        async with db.transaction():
            db.after_commit(lambda: ran.append("x"))
            raise Boom
    assert ran == []


async def test_a_rolled_back_savepoint_drops_only_its_own_hooks(db: Database) -> None:
    ran: list[str] = []
    async with db.transaction():
        db.after_commit(lambda: ran.append("kept"))
        with pytest.raises(Boom):
            async with db.transaction():
                db.after_commit(lambda: ran.append("dropped"))
                raise Boom
    assert ran == ["kept"]


async def test_outside_a_transaction_a_hook_runs_at_once(db: Database) -> None:
    ran: list[str] = []
    db.after_commit(lambda: ran.append("now"))
    assert ran == ["now"]
