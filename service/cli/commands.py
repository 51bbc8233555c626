"""One function per sub-command: read the arguments, call the library, show the result."""

from __future__ import annotations

import argparse
import asyncio
import itertools
from dataclasses import fields
from pathlib import Path
from typing import Any

from service.cli.output import Output, confirm, confirm_typed, download_summary
from service.cli.progress import RichProgress
from service.client import Client, DatasetInfo, NotFoundError
from service.config import Config, ConfigError


def client_of(args: argparse.Namespace) -> Client:
    if not args.key:
        raise ValueError(
            "no API key: pass --key or set DATASETD_API_KEY "
            "(`make run` prints the bootstrap key of app 'main')"
        )
    return Client(
        args.address,
        args.key,
        args.app,
        tls=args.tls,
        ca_file=args.ca_file,
        client_cert=args.client_cert,
        client_key=args.client_key,
    )


def _progress(args: argparse.Namespace) -> dict[str, Any]:
    """Progress bars on stderr unless --no-progress or --json (stdout stays parseable)."""
    shown = not getattr(args, "no_progress", False) and not args.json
    return {"show_progress": shown, "progress": RichProgress()}


# --- server side --------------------------------------------------------------


def serve(args: argparse.Namespace, output: Output) -> int:
    from service.observability import setup_logging

    # Not service.app: with DATASETD_WORKERS above 1 this process only supervises the
    # workers, and stays small without the server's imports.
    from service.supervisor import serve as run_server

    config = _config(output)
    if config is None:
        return 2
    setup_logging(config.log_level, config.log_format)
    asyncio.run(run_server(config))
    return 0


def migrate(args: argparse.Namespace, output: Output) -> int:
    config = _config(output)
    if config is None:
        return 2
    if not config.database_url:
        # Without it open_database would start an embedded server: nothing to migrate there
        # that `serve` would not migrate itself.
        output.errors.print(
            "error: set DATASETD_DATABASE_URL to the database to migrate",
            highlight=False,
            markup=False,
        )
        return 2
    import asyncpg

    try:
        applied = asyncio.run(_migrate(config))
    except asyncpg.PostgresError as error:
        # Refused by the server (credentials, permissions, a failing migration): one line for
        # the Job's log; the failed migration's transaction was rolled back.
        output.errors.print(f"error: migration failed: {error}", highlight=False, markup=False)
        return 1
    names = [f"{version:04d}_{name}" for version, name in applied]
    output.outcome(
        {"applied": names},
        "applied migrations: " + ", ".join(names)
        if names
        else "no migrations to apply: the schema is up to date",
    )
    return 0


async def _migrate(config: Config) -> list[tuple[int, str]]:
    """The migrations this run applied, as (version, name)."""
    from service.app import open_database
    from service.storage.db import migrate as apply_migrations

    async with open_database(config) as db, db.connection() as conn:
        versions = await apply_migrations(conn)
        rows = await conn.fetch(
            "SELECT version, name FROM schema_migrations WHERE version = ANY($1::int[])"
            " ORDER BY version",
            versions,
        )
    return [(row["version"], row["name"]) for row in rows]


def _config(output: Output) -> Config | None:
    try:
        return Config.from_env()
    except ConfigError as exc:
        output.errors.print(f"configuration error: {exc}", highlight=False, markup=False)
        return None


# --- datasets ----------------------------------------------------------------

_DATASET_COLUMNS = ("id", "description", "visibility", "created_at", "modified_at")


def fields_of(value: Any, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A result dataclass's fields as a row (nested values stay as they are)."""
    return {f.name: getattr(value, f.name) for f in fields(value) if f.name not in leave_out}


def _dataset_row(dataset: DatasetInfo) -> dict[str, Any]:
    return fields_of(dataset, leave_out=("statistic",))


def _dataset_record(dataset: DatasetInfo) -> dict[str, Any]:
    stat = dataset.statistic
    return _dataset_row(dataset) | {
        "assets": stat.asset_total,
        "annotated_assets": stat.asset_annotated,
        "annotations": stat.annotation_total,
        "tags": stat.tags_count,
    }


def datasets_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        rows = [
            _dataset_row(d)
            for d in client.datasets.all_items(page_size=args.page_size, query=args.query)
        ]
    output.table(rows, _DATASET_COLUMNS, f"datasets of app {args.app}")
    return 0


def datasets_get(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        dataset = client.datasets.get(args.dataset)
    output.record(_dataset_record(dataset), f"dataset {dataset.id}")
    return 0


def datasets_create(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        dataset = client.datasets.create(
            args.dataset, description=args.description, notes=args.notes, metadata=args.metadata
        )
    output.record(_dataset_row(dataset), f"created dataset {dataset.id}")
    return 0


def datasets_patch(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        dataset = client.datasets.patch(
            args.dataset,
            action=args.action,
            description=args.description,
            notes=args.notes,
            metadata=args.metadata,
            etag=args.etag,
        )
    output.record(_dataset_row(dataset), f"patched dataset {dataset.id}")
    return 0


def datasets_delete(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        try:
            stat = client.datasets.get(args.dataset).statistic
            what = f"with {stat.asset_total} assets and {stat.annotation_total} annotations"
        except NotFoundError:
            # A deleted dataset can still be purged for good; the server says if it is unknown.
            if not args.force:
                raise
            what = "(already deleted, recoverable until purged)"
        how = "permanently (--force: it cannot be undone)" if args.force else "recoverably"
        confirm_typed(
            output, f"Dataset {args.dataset} {what} will be deleted {how}.", args.dataset, args.yes
        )
        deleted = client.datasets.delete(args.dataset, force=args.force)
    until = deleted.purge_time.isoformat(timespec="seconds") if deleted.purge_time else "-"
    output.outcome(
        {"dataset_id": args.dataset, "purged": deleted.purged, "purge_time": deleted.purge_time},
        f"Dataset {args.dataset} was purged."
        if deleted.purged
        else f"Dataset {args.dataset} was deleted; `datasetd datasets undelete {args.dataset}` "
        f"restores it until {until}.",
    )
    return 0


def datasets_undelete(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        dataset = client.datasets.undelete(args.dataset)
    output.record(_dataset_row(dataset), f"restored dataset {dataset.id}")
    return 0


# --- uploads -----------------------------------------------------------------


def _upload_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return _progress(args) | {
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "failure_log": Path(args.failure_log) if args.failure_log else None,
    }


def _upload_result(output: Output, result: Any) -> int:
    """Exit status 0 only when nothing is left in the failure log; the summary says what is."""
    if output.as_json:
        output.document(result)
    else:
        output.console.print(result.summary(), highlight=False, markup=False)
    return 0 if result.failed == 0 and not result.failures else 1


def upload_folder(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        result = client.dataset(args.dataset).upload_from_folder(
            Path(args.folder),
            input_type=args.input_type,
            labels=args.labels,
            **_upload_kwargs(args),
        )
    return _upload_result(output, result)


def upload_csv(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        result = client.dataset(args.dataset).upload_from_csv(
            Path(args.csv),
            input_type=args.input_type,
            csv_type=args.csv_type,
            labels=not args.no_labels,
            **_upload_kwargs(args),
        )
    return _upload_result(output, result)


def upload_coco(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        result = client.dataset(args.dataset).upload_coco(
            Path(args.images), Path(args.annotations), **_upload_kwargs(args)
        )
    return _upload_result(output, result)


def retry(args: argparse.Namespace, output: Output) -> int:
    from service.client.uploads import retry as retry_log

    options = _upload_kwargs(args)
    # Here --failure-log is where the rows that still fail go (default: the log itself).
    options["new_failure_log"] = options.pop("failure_log")
    with client_of(args) as client:
        result = retry_log(
            client.rpc, Path(args.log), allow_duplicates=args.allow_duplicates, **options
        )
    return _upload_result(output, result)


# --- versions, exports, downloads --------------------------------------------

_VERSION_COLUMNS = ("id", "status", "inputs", "description", "created_at")


def _version_row(version: Any) -> dict[str, Any]:
    row: dict[str, Any] = version.to_dict()
    row["inputs"] = row.get("inputs_count")
    return row


def versions_create(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        version = client.dataset(args.dataset).create_version(
            args.version_id,
            description=args.description,
            wait=not args.no_wait,
            **_progress(args),
        )
    output.record(_version_row(version), f"version {version.id} of {args.dataset}")
    return 0


def versions_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        rows = [_version_row(v) for v in client.dataset(args.dataset).list_versions()]
    output.table(rows, _VERSION_COLUMNS, f"versions of dataset {args.dataset}")
    return 0


def versions_get(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        version = client.dataset(args.dataset).get_version(args.version)
    output.record(_version_row(version), f"version {version.id} of {args.dataset}")
    return 0


def versions_delete(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        dataset = client.dataset(args.dataset)
        version = dataset.get_version(args.version)
        confirm(
            output,
            f"Version {version.id} of dataset {args.dataset} ({_version_row(version)['inputs']} "
            "inputs) and its exports will be deleted; the dataset itself is not changed.",
            args.yes,
        )
        dataset.delete_version(args.version)
    output.outcome(
        {"dataset_id": args.dataset, "version_id": args.version, "deleted": True},
        f"Version {args.version} of dataset {args.dataset} was deleted.",
    )
    return 0


def _export_settings(args: argparse.Namespace, embed_media: bool) -> Any:
    from service.client.exports import ExportSettings

    return ExportSettings(
        format=args.format or "clarifai_data_protobuf",
        split_ratio=args.split,
        seed=args.seed,
        embed_media=embed_media,
        normalized=getattr(args, "normalized", None),
    )


def export(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        settings = _export_settings(args, embed_media=not args.no_embed_media)
        created = client.datasets.create_export(args.dataset, settings, version_id=args.version)
        finished = client.datasets.wait_export(
            args.dataset,
            created.id,
            version_id=created.version_id,
            **_progress(args),
        )
    output.record(finished, f"export {finished.id}")
    return 0


def download(args: argparse.Namespace, output: Output) -> int:
    from service.client.exports import ExportSettings

    with client_of(args) as client:
        settings = _export_settings(args, embed_media=not args.annotations_only)
        export_id = None
        if args.format is None:
            # Without --format, the export the user already made (e.g. `export --format
            # coco`) is what they want on disk, not a new one in the default format.
            version = args.version or client.dataset(args.dataset).latest_or_new().id
            found = client.datasets.find_export(
                args.dataset,
                version,
                split_ratio=args.split,
                embed_media=None if args.annotations_only else True,
            )
            if found is not None:
                export_id = found.id
                settings = ExportSettings(format=found.format, normalized=args.normalized)
            args.version = version
        result = client.datasets.download(
            args.dataset,
            Path(args.save_dir),
            export_settings=settings,
            annotations_only=args.annotations_only,
            overwrite=args.overwrite,
            version_id=args.version,
            export_id=export_id,
            **_progress(args),
        )
    if output.as_json:
        output.document(result)
    else:
        output.console.print(download_summary(result), highlight=False, markup=False)
    return 0


def merge(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        merged = client.dataset(args.dataset).merge_dataset(args.source)
    output.outcome(
        {"destination": args.dataset, "source": args.source}
        | {"added": merged.added, "already_present": merged.already_present},
        f"Merged {args.source} into {args.dataset}: {merged.added} inputs added, "
        f"{merged.already_present} already present.",
    )
    return 0


# --- inputs ------------------------------------------------------------------

_INPUT_COLUMNS = ("id", "media_type", "concepts", "metadata", "created_at")


def inputs_list(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        listed = client.dataset(args.dataset).list_inputs()
        rows = [fields_of(i) for i in itertools.islice(listed, args.limit)]
    output.table(rows, _INPUT_COLUMNS, f"inputs of dataset {args.dataset}")
    return 0


def inputs_get(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        item = client.dataset(args.dataset).get_input(args.input)
    output.record(fields_of(item), f"input {item.id}")
    return 0


def inputs_delete(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        dataset = client.dataset(args.dataset)
        shown = ", ".join(args.inputs[:10]) + (" ..." if len(args.inputs) > 10 else "")
        confirm(
            output,
            f"{len(args.inputs)} inputs ({shown}) will be deleted with their annotations, "
            "from every dataset that holds them.",
            args.yes,
        )
        deleted, unknown = dataset.delete_inputs(list(args.inputs))
    output.outcome(
        {"deleted": deleted, "unknown_ids": unknown},
        f"Deleted {deleted} inputs." + (f" Unknown ids: {', '.join(unknown)}" if unknown else ""),
    )
    return 0


def inputs_download(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        downloaded = client.dataset(args.dataset).download_inputs(
            Path(args.save_dir), **_progress(args)
        )
    rows = [fields_of(d) for d in downloaded]
    output.table(rows, ("input_id", "path", "size"), f"downloaded into {args.save_dir}")
    missing = [d.input_id for d in downloaded if d.path is None]
    if missing:
        output.text(
            f"{len(missing)} inputs have no stored media (created from a URL): {', '.join(missing)}"
        )
    return 0


_REENCODE_COLUMNS = ("input_id", "outcome", "duration_seconds", "fps", "codec", "size", "details")


def inputs_reencode(args: argparse.Namespace, output: Output) -> int:
    from service.client.inputs import ReencodeFailedError

    with client_of(args) as client:
        if args.dry_run:
            found = client.inputs.reencode_candidates(list(args.inputs))
            rows = [fields_of(c) for c in found]
            output.table(
                rows,
                ("input_id", "video_format", "codec", "reason"),
                f"{len(rows)} of {len(args.inputs)} videos a browser could not play as they are",
            )
            return 0
        try:
            job = client.inputs.reencode(
                list(args.inputs), wait=not args.no_wait, **_progress(args)
            )
        except ReencodeFailedError as failed:
            job = failed.job
    if args.no_wait:
        output.record({"job_id": job.id, "state": job.state}, f"re-encode job {job.id}")
        return 0
    rows = [fields_of(r) for r in job.results]
    output.table(rows, _REENCODE_COLUMNS, f"re-encode job {job.id}: {job.state}")
    failed_count = sum(1 for r in job.results if r.outcome != "REENCODED")
    return 0 if job.state == "SUCCEEDED" and not failed_count else 1


def inputs_rename(args: argparse.Namespace, output: Output) -> int:
    with client_of(args) as client:
        item = client.inputs.rename(args.input, args.title)
    output.record(fields_of(item), f"input {item.id}")
    return 0
