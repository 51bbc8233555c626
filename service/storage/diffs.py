"""PostgreSQL reads for version diffs: two versions' members side by side, by input id."""

from __future__ import annotations

from dataclasses import astuple

import asyncpg

from service.domain.diffs import MemberPair, VersionPair
from service.storage.db import Repository
from service.storage.rows import record

# No row lock (a hot standby refuses one): the diff reads each page in one snapshot, in
# which a version found here keeps all its members until the page is read.
EXISTING_VERSIONS = """
SELECT id FROM dataset_versions
WHERE app_id = $1 AND dataset_id = $2 AND id = ANY($3::text[])
"""
# One step of an ordered merge. Each side takes its first `limit` members after the
# cursor (an index range scan of version_inputs_by_input); the first `limit` ids of their
# union are then complete, because any of them has at most `limit` predecessors on
# either side. The older side's bytes are only sent where the newer side's cannot stand
# in for them: an unchanged input is read once. Content is shared (input_contents): the
# hashes compare versions without reading it.
PAGE = """
WITH f AS (
    SELECT input_id, content_hash FROM version_inputs
    WHERE app_id = $1 AND dataset_id = $2 AND version_id = $3
      AND ($5::text IS NULL OR input_id COLLATE "C" > $5::text)
    ORDER BY input_id COLLATE "C" LIMIT $6),
t AS (
    SELECT input_id, content_hash FROM version_inputs
    WHERE app_id = $1 AND dataset_id = $2 AND version_id = $4
      AND ($5::text IS NULL OR input_id COLLATE "C" > $5::text)
    ORDER BY input_id COLLATE "C" LIMIT $6)
SELECT coalesce(f.input_id, t.input_id) AS input_id,
       f.input_id IS NOT NULL AS in_from,
       t.input_id IS NOT NULL AS in_to,
       f.content_hash IS NOT DISTINCT FROM t.content_hash AS same,
       CASE WHEN t.input_id IS NULL OR f.content_hash IS DISTINCT FROM t.content_hash
            THEN (SELECT c.data FROM input_contents c WHERE c.hash = f.content_hash)
       END AS from_data,
       (SELECT c.data FROM input_contents c WHERE c.hash = t.content_hash) AS to_data
FROM f FULL JOIN t ON f.input_id = t.input_id
ORDER BY coalesce(f.input_id, t.input_id) COLLATE "C" LIMIT $6
"""


def _member_pair(row: asyncpg.Record) -> MemberPair:
    # Equal hashes mean the same content only where both versions have the input.
    return record(MemberPair, row, same=row["in_from"] and row["in_to"] and row["same"])


class PgVersionPairs(Repository):
    """The domain's VersionPairs."""

    async def existing(self, app_id: str, dataset_id: str, version_ids: list[str]) -> set[str]:
        rows = await self._db.fetch(EXISTING_VERSIONS, app_id, dataset_id, version_ids)
        return {r["id"] for r in rows}

    async def page(
        self, pair: VersionPair, after_input_id: str | None, limit: int
    ) -> list[MemberPair]:
        return await self._all(_member_pair, PAGE, *astuple(pair), after_input_id, limit)
