"""`datasetd search`, `datasetd duplicates` and `datasetd datasets add-from-search`."""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.commands import _progress, client_of
from service.cli.main import CommandTree, _json_object, positive_int
from service.cli.output import Output

if TYPE_CHECKING:
    from service.cli.main import SubParsers
    from service.client.search import Hit

_MEDIA_TYPES = ("image", "video", "audio", "text")
_HIT_COLUMNS = ("rank", "id", "score", "media_type", "concepts", "metadata", "created_at")


def _floats(text: str, names: tuple[str, ...]) -> tuple[float, ...]:
    parts = text.split(",")
    shape = ",".join(names)
    if len(parts) != len(names):
        raise argparse.ArgumentTypeError(f"expected {shape} ({len(names)} numbers), got {text!r}")
    values: list[float] = []
    for name, part in zip(names, parts, strict=True):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} is not a number: {part.strip()!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {part!r}")
        values.append(value)
    return tuple(values)


def _near(text: str) -> tuple[float, ...]:
    """`LAT,LON,KM`; the ranges are the server's to check (it names the field)."""
    return _floats(text, ("LAT", "LON", "KM"))


def _box(text: str) -> tuple[float, ...]:
    return _floats(text, ("MINLAT", "MAXLAT", "MINLON", "MAXLON"))


def _moment(text: str) -> datetime:
    """ISO 8601; without an offset, UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 date or time: {text!r} (e.g. 2024-05-01 or 2024-05-01T12:00:00+02:00)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def read_vector(path: str) -> list[float]:
    """A vector file: a JSON array of numbers, or one number per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--vector-file {path}: cannot read it: {error}") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise ValueError(f"--vector-file {path}: not valid JSON: {error}") from None
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"--vector-file {path}: the JSON must be an array of numbers")
        numbers = [float(v) for v in value]
    else:
        numbers = []
        for number, line in enumerate(stripped.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbers.append(float(line))
            except ValueError:
                raise ValueError(
                    f"--vector-file {path}, line {number}: not a number: {line.strip()!r} "
                    "(expected a JSON array or one number per line)"
                ) from None
    if not numbers:
        raise ValueError(f"--vector-file {path}: no numbers in it")
    bad = [i for i, v in enumerate(numbers) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"--vector-file {path}: component {bad[0]} is not a finite number")
    return numbers


def query_flags(parser: argparse.ArgumentParser) -> None:
    """The filters and the rank of a search, as `query_arguments` reads them."""
    filters = parser.add_argument_group("filters (all must hold)")
    filters.add_argument(
        "--concept",
        dest="concepts",
        action="append",
        metavar="C",
        help="labelled with concept C (on the input or in a region); repeatable",
    )
    filters.add_argument(
        "--not-concept",
        dest="not_concepts",
        action="append",
        metavar="C",
        help="not labelled with concept C; repeatable",
    )
    filters.add_argument(
        "--metadata", type=_json_object, default=None, help="metadata containing this JSON object"
    )
    filters.add_argument(
        "--media-type",
        dest="media_types",
        action="append",
        choices=_MEDIA_TYPES,
        help="of this media type; repeatable (any of them)",
    )
    annotated = filters.add_mutually_exclusive_group()
    annotated.add_argument(
        "--annotated",
        dest="annotated",
        action="store_const",
        const=True,
        default=None,
        help="with at least one annotation",
    )
    annotated.add_argument(
        "--unannotated",
        dest="annotated",
        action="store_const",
        const=False,
        help="without any annotation",
    )
    filters.add_argument(
        "--near", type=_near, metavar="LAT,LON,KM", help="geo point within KM of LAT,LON"
    )
    filters.add_argument(
        "--box", type=_box, metavar="MINLAT,MAXLAT,MINLON,MAXLON", help="geo point inside the box"
    )
    filters.add_argument(
        "--created-after", type=_moment, metavar="ISO", help="created at or after (no offset: UTC)"
    )
    filters.add_argument(
        "--created-before", type=_moment, metavar="ISO", help="created before (no offset: UTC)"
    )
    rank = parser.add_argument_group("rank by cosine similarity (one of)")
    target = rank.add_mutually_exclusive_group()
    target.add_argument("--similar-to", metavar="INPUT_ID", help="to this input's embedding")
    target.add_argument("--image", metavar="FILE", help="to this image")
    target.add_argument("--text", help="to this text (with a model that embeds texts)")
    target.add_argument(
        "--vector-file", metavar="FILE", help="to this vector: a JSON array or one number per line"
    )
    rank.add_argument(
        "--model", default="", help="embedding model id (required with --vector-file)"
    )
    rank.add_argument(
        "--min-score", type=_score, default=None, metavar="S", help="only hits scoring at least S"
    )


def query_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The client's search keyword arguments of the flags `query_flags` added."""
    query: dict[str, Any] = {}
    for name in (
        "concepts",
        "not_concepts",
        "metadata",
        "media_types",
        "annotated",
        "near",
        "box",
        "created_after",
        "created_before",
        "text",
        "min_score",
    ):
        value = getattr(args, name)
        if value is not None:
            query[name] = value
    if args.similar_to is not None:
        query["similar_to"] = args.similar_to
    if args.image is not None:
        try:
            query["image"] = Path(args.image).read_bytes()
        except OSError as error:
            raise ValueError(f"--image {args.image}: cannot read it: {error.strerror}") from None
    if args.vector_file is not None:
        query["vector"] = read_vector(args.vector_file)
    if args.model:
        query["model_id"] = args.model
    targets = ("similar_to", "image", "text", "vector")
    if not any(name in query for name in targets):
        if args.min_score is not None:
            raise ValueError(
                "--min-score needs a rank: --similar-to, --image, --text or --vector-file"
            )
        if args.model:
            raise ValueError("--model needs a rank: --similar-to, --image, --text or --vector-file")
    return query


def _hit_row(rank: int, hit: Hit) -> dict[str, Any]:
    item = hit.input
    return {
        "rank": rank,
        "id": item.id,
        "score": round(hit.score, 4),
        "media_type": item.media_type,
        "concepts": item.concepts,
        "metadata": item.metadata,
        "created_at": item.created_at,
        "title": item.title,
        "url": item.url,
        "dataset_ids": item.dataset_ids,
    }


def search(args: argparse.Namespace, output: Output) -> int:
    if args.version and not args.dataset:
        raise ValueError("--version needs --dataset (a version belongs to one dataset)")
    query = query_arguments(args)
    with client_of(args) as client:
        pages = (
            client.dataset(args.dataset).search(version=args.version, limit=args.limit, **query)
            if args.dataset
            else client.search(limit=args.limit, **query)
        )
        hits = [hit for page in pages for hit in page]
    where = f"dataset {args.dataset}" if args.dataset else f"app {args.app}"
    if args.version:
        where += f" version {args.version}"
    rows = [_hit_row(n, hit) for n, hit in enumerate(hits, start=1)]
    if output.as_json:
        output.document([{"input": h.input, "score": h.score} for h in hits])
        return 0
    ranked = any(name in query for name in ("similar_to", "image", "text", "vector"))
    columns = _HIT_COLUMNS if ranked else tuple(c for c in _HIT_COLUMNS if c != "score")
    more = " (--limit reached)" if len(hits) == args.limit else ""
    output.table(rows, columns, f"{len(hits)} hits in {where}{more}")
    return 0


def duplicates(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        found = client.dataset(args.dataset).duplicates(
            threshold=args.threshold,
            exact_only=args.exact_only,
            model_id=args.model,
            version=args.version,
        )
    if output.as_json:
        output.document(found)
        return 0
    rows = [
        {
            "group": n,
            "kind": "exact" if group.exact else "near",
            "min_similarity": round(group.min_similarity, 4),
            "keep": group.input_ids[0],
            "copies": group.input_ids[1:],
        }
        for n, group in enumerate(found.groups, start=1)
    ]
    where = args.dataset + (f" version {args.version}" if args.version else "")
    output.table(
        rows,
        ("group", "kind", "min_similarity", "keep", "copies"),
        f"{len(rows)} duplicate groups among {found.scanned} inputs of {where}",
    )
    if found.not_embedded:
        output.text(
            f"{found.not_embedded} inputs have no embedding of the model yet (pending or failed): "
            "only exact duplicates of them were looked for."
        )
    return 0


def add_from_search(args: argparse.Namespace, output: Output) -> int:
    if args.from_version and not args.from_dataset:
        raise ValueError("--from-version needs --from-dataset (a version belongs to one dataset)")
    query = query_arguments(args)
    with client_of(args) as client:
        result = client.dataset(args.dataset).add_from_search(
            from_dataset=args.from_dataset,
            from_version=args.from_version,
            dry_run=args.dry_run,
            **_progress(args),
            **query,
        )
    document = {
        "dataset_id": args.dataset,
        "matched": result.matched,
        "added": result.added,
        "already_present": result.already_present,
        "dry_run": result.dry_run,
        "job_id": result.job.id if result.job else None,
    }
    if result.dry_run:
        message = f"{result.matched} inputs match; nothing was added (--dry-run)."
    else:
        job = f" (job {result.job.id})" if result.job else ""
        message = (
            f"{result.matched} inputs matched{job}: {result.added} added to {args.dataset}, "
            f"{result.already_present} already present."
        )
    output.outcome(document, message)
    return 0


def add_commands(tree: CommandTree) -> None:
    sub = tree.command(
        tree.top,
        "search",
        search,
        "find inputs by concepts, metadata, geo, media type and time, ranked by similarity",
    )
    sub.add_argument("--dataset", default=None, help="only this dataset's inputs (default: app)")
    sub.add_argument("--version", default=None, help="only this READY version's (needs --dataset)")
    sub.add_argument(
        "--limit", type=positive_int, default=50, help="show at most this many hits (50)"
    )
    query_flags(sub)

    sub = tree.command(
        tree.top, "duplicates", duplicates, "groups of exact and near-duplicate inputs"
    )
    sub.add_argument("--dataset", required=True, help="the dataset to look in")
    sub.add_argument("--version", default=None, help="a READY version of it instead")
    sub.add_argument(
        "--threshold",
        type=_score,
        default=None,
        help="cosine similarity of near duplicates, 0.5..1 (0.95)",
    )
    sub.add_argument(
        "--exact-only", action="store_true", help="only exact copies (no embeddings needed)"
    )
    sub.add_argument("--model", default="", help="embedding model (default: the built-in one)")


def add_dataset_commands(tree: CommandTree, datasets: SubParsers) -> None:
    """`datasets add-from-search`, in the `datasets` section."""
    sub = tree.command(
        datasets,
        "add-from-search",
        add_from_search,
        "add every input matching a search to DATASET (a server job when there are many)",
        "dataset",
    )
    sub.add_argument(
        "--from-dataset", default=None, help="search only this dataset's inputs (default: app)"
    )
    sub.add_argument(
        "--from-version", default=None, help="only this READY version's (needs --from-dataset)"
    )
    sub.add_argument("--dry-run", action="store_true", help="only count the matches")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    query_flags(sub)
