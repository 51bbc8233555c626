"""The search RPCs of SearchService (SearchInputs, ListEmbeddingModels,
GetInputEmbeddings): decode, call the domain, encode. The search jobs' RPCs are another
part (search_jobs.py)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from datasetd.v1 import search_service_pb2

from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.api.rpc import Context
from service.domain.embeddings import SearchCursor
from service.domain.errors import InvalidArgument
from service.domain.search import SearchService
from service.wire.search import (
    hit_to_proto,
    input_embedding_to_proto,
    model_to_proto,
    search_spec_from_proto,
)


@dataclass(frozen=True)
class SearchRpcs:
    search: SearchService
    tokens: PageTokens

    async def SearchInputs(
        self, request: search_service_pb2.SearchInputsRequest, context: Context
    ) -> search_service_pb2.SearchInputsResponse:
        limit = page_size(request.page_size)
        # A token is bound to the query's bytes: under another query it is refused.
        query = request.query.SerializeToString(deterministic=True)
        scope = {
            "method": "SearchInputs",
            "app_id": request.app_id,
            "query": hashlib.sha256(query).hexdigest(),
        }
        after = None
        if request.page_token:
            after = _cursor(self.tokens.decode(request.page_token, scope))
        spec = search_spec_from_proto(request.app_id, request.query, "query")
        page = await self.search.search(current_principal(), request.app_id, spec, after, limit)
        response = search_service_pb2.SearchInputsResponse(
            hits=[hit_to_proto(view, score) for view, score in page.hits]
        )
        if page.next is not None:
            response.next_page_token = self.tokens.encode(scope, [page.next.seq, page.next.score])
        return response

    async def ListEmbeddingModels(
        self, request: search_service_pb2.ListEmbeddingModelsRequest, context: Context
    ) -> search_service_pb2.ListEmbeddingModelsResponse:
        counted = await self.search.models(current_principal(), request.app_id)
        return search_service_pb2.ListEmbeddingModelsResponse(
            models=[model_to_proto(c.model, c.embedded_count) for c in counted]
        )

    async def GetInputEmbeddings(
        self, request: search_service_pb2.GetInputEmbeddingsRequest, context: Context
    ) -> search_service_pb2.GetInputEmbeddingsResponse:
        found = await self.search.input_embeddings(
            current_principal(),
            request.app_id,
            request.input_id,
            vectors=request.include_vectors,
        )
        return search_service_pb2.GetInputEmbeddingsResponse(
            embeddings=[input_embedding_to_proto(e) for e in found]
        )


def _cursor(cursor: list[Any]) -> SearchCursor:
    """The last hit of the previous page, as its token carries it: [seq, score or null]."""
    malformed = InvalidArgument.field("page_token", "is malformed", reason="INVALID_PAGE_TOKEN")
    if len(cursor) != 2:
        raise malformed
    seq, score = cursor
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise malformed
    if score is not None and (
        not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score)
    ):
        raise malformed
    return SearchCursor(seq=seq, score=None if score is None else float(score))
