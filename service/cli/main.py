"""`datasetd`: the server (`serve`, `keys`) and a client of it (everything else).

Client commands talk to a running server over gRPC through `service.client`;
the address, app and API key come from options or DATASETD_ADDRESS,
DATASETD_APP and DATASETD_API_KEY. Without an address, the client commands go where a
server started with the same environment listens (DATASETD_LISTEN): one variable moves
both off the default port.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from service.cli.output import ConfirmationRefused, Output
from service.client.address import default_address

DEFAULT_APP = "main"

Handler = Callable[[argparse.Namespace, Output], int]
if TYPE_CHECKING:
    # Only subscriptable for type checkers.
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"source": "camera"}\'')
    return value


def _batch_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 128:
        raise argparse.ArgumentTypeError(f"must be between 1 and 128, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _splits(text: str) -> dict[str, float]:
    """`train=0.8,validation=0.2`."""
    ratios: dict[str, float] = {}
    for part in text.split(","):
        name, sep, ratio = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"expected name=ratio pairs such as train=0.8, got {part!r}"
            )
        try:
            ratios[name.strip()] = float(ratio)
        except ValueError:
            raise argparse.ArgumentTypeError(f"ratio of {name.strip()!r} is not a number") from None
    return ratios


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Global options, accepted before or after the sub-command.

    Sub-command copies default to SUPPRESS so they don't overwrite a value
    given before the sub-command.
    """

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=default(default_address(os.environ)),
        help="server host:port (env DATASETD_ADDRESS, else that of DATASETD_LISTEN; "
        "default %(default)s)"
        if defaults
        else argparse.SUPPRESS,
    )
    group.add_argument(
        "--app",
        default=default(os.environ.get("DATASETD_APP", DEFAULT_APP)),
        help="app id (env DATASETD_APP, default main)" if defaults else argparse.SUPPRESS,
    )
    group.add_argument(
        "--key",
        default=default(os.environ.get("DATASETD_API_KEY", "")),
        help="API key (env DATASETD_API_KEY)" if defaults else argparse.SUPPRESS,
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(os.environ.get("DATASETD_TLS", "") in ("1", "true")),
        help="connect with TLS (env DATASETD_TLS=1)" if defaults else argparse.SUPPRESS,
    )
    group.add_argument(
        "--ca-file",
        default=default(os.environ.get("DATASETD_CA_FILE") or None),
        help="PEM CA certificates to verify the server with instead of the system's; "
        "implies --tls (env DATASETD_CA_FILE)"
        if defaults
        else argparse.SUPPRESS,
    )
    group.add_argument(
        "--client-cert",
        default=default(os.environ.get("DATASETD_CLIENT_CERT") or None),
        help="PEM client certificate for a server that requires one; implies --tls "
        "(env DATASETD_CLIENT_CERT)"
        if defaults
        else argparse.SUPPRESS,
    )
    group.add_argument(
        "--client-key",
        default=default(os.environ.get("DATASETD_CLIENT_KEY") or None),
        help="PEM private key of --client-cert (env DATASETD_CLIENT_KEY)"
        if defaults
        else argparse.SUPPRESS,
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON instead of tables" if defaults else argparse.SUPPRESS,
    )


def _upload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=_batch_size, default=32, help="inputs per request, 1..128 (32)"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=4, help="requests in flight at once (4)"
    )
    parser.add_argument(
        "--failure-log",
        default=None,
        help="where to write failed rows (default ./datasetd-failures-<dataset>.csv)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=("clarifai_data_protobuf", "clarifai_data_json", "coco", "vi_full", "vi_jsonl"),
        default=None,
        help="export: clarifai_data_protobuf by default; download: the newest finished export "
        "of the version (with --split's ratios) whatever its format, else clarifai_data_protobuf",
    )
    parser.add_argument("--split", type=_splits, default=None, help="e.g. train=0.8,validation=0.2")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    parser.add_argument("--version", default=None, help="version id (default: the latest READY)")


def add_confirm_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


class CommandTree:
    """Adds sub-commands; each gets the global options and its handler."""

    def __init__(self, top: SubParsers) -> None:
        self.top = top

    def command(
        self, group: SubParsers, name: str, handler: Handler, help_text: str, *positionals: str
    ) -> argparse.ArgumentParser:
        """The sub-command, with its plain positional arguments (e.g. "dataset") in order."""
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, defaults=False)
        sub.set_defaults(handler=handler)
        for positional in positionals:
            sub.add_argument(positional)
        return sub

    def section(self, name: str, help_text: str) -> SubParsers:
        sub = self.top.add_parser(name, help=help_text, description=help_text)
        group: SubParsers = sub.add_subparsers(
            dest=f"{name}_command", required=True, metavar="COMMAND"
        )
        return group


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datasetd",
        description="datasetd: run the server, or manage datasets on one.",
        epilog="Client commands need a key: --key or DATASETD_API_KEY.",
    )
    _global_options(parser, defaults=True)
    tree = CommandTree(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    _server_commands(tree)
    _dataset_commands(tree)
    _upload_commands(tree)
    _version_commands(tree)
    _input_commands(tree)
    from service.cli.ontologies import add_commands as ontology_and_project_commands

    ontology_and_project_commands(tree)
    from service.cli.search import add_commands as search_commands

    search_commands(tree)
    from service.cli.access import add_commands as access_commands

    access_commands(tree)
    return parser


def _server_commands(tree: CommandTree) -> None:
    from service.cli import commands as c

    tree.command(
        tree.top, "serve", c.serve, "run the gRPC server (settings from DATASETD_* variables)"
    )
    tree.command(
        tree.top,
        "migrate",
        c.migrate,
        "apply pending database migrations to DATASETD_DATABASE_URL and exit",
    )


def _dataset_commands(tree: CommandTree) -> None:
    from service.cli import commands as c

    datasets = tree.section("datasets", "list, inspect, create, change and delete datasets")
    sub = tree.command(datasets, "list", c.datasets_list, "list the app's datasets")
    sub.add_argument("--query", default="", help="only datasets whose id or description match")
    sub.add_argument("--page-size", type=positive_int, default=100)
    tree.command(datasets, "get", c.datasets_get, "show a dataset with its statistics", "dataset")
    sub = tree.command(datasets, "create", c.datasets_create, "create a dataset")
    sub.add_argument("dataset", nargs="?", default="", help="id (generated when left out)")
    sub.add_argument("--description", default="")
    sub.add_argument("--notes", default="")
    sub.add_argument("--metadata", type=_json_object, default=None, help="a JSON object")
    sub = tree.command(datasets, "patch", c.datasets_patch, "change a dataset's fields", "dataset")
    sub.add_argument("--action", choices=("merge", "overwrite", "remove"), default="merge")
    sub.add_argument("--description", default=None)
    sub.add_argument("--notes", default=None)
    sub.add_argument("--metadata", type=_json_object, default=None, help="a JSON object")
    sub.add_argument("--etag", default=None, help="fail if the dataset changed since this etag")
    sub = tree.command(
        datasets, "delete", c.datasets_delete, "delete a dataset (recoverable)", "dataset"
    )
    sub.add_argument("--force", action="store_true", help="purge now; cannot be undone")
    add_confirm_option(sub)
    tree.command(datasets, "undelete", c.datasets_undelete, "restore a deleted dataset", "dataset")
    from service.cli.search import add_dataset_commands as search_dataset_commands

    search_dataset_commands(tree, datasets)


def _upload_commands(tree: CommandTree) -> None:
    from service.cli import commands as c

    upload = tree.section("upload", "upload a folder, a CSV file or a COCO dataset into a dataset")
    sub = tree.command(
        upload,
        "folder",
        c.upload_folder,
        "upload the image or .txt files of a folder",
        "dataset",
        "folder",
    )
    sub.add_argument("--type", dest="input_type", choices=("image", "text"), default="image")
    sub.add_argument("--labels", action="store_true", help="label each file with its folder's name")
    _upload_options(sub)
    sub = tree.command(
        upload, "csv", c.upload_csv, "upload the rows of a CSV file", "dataset", "csv"
    )
    sub.add_argument(
        "--type", dest="input_type", choices=("image", "text", "video", "audio"), default="image"
    )
    sub.add_argument("--csv-type", choices=("url", "file_path", "raw"), default="url")
    sub.add_argument("--no-labels", action="store_true", help="ignore the concepts column")
    _upload_options(sub)
    sub = tree.command(upload, "coco", c.upload_coco, "upload a COCO detection dataset", "dataset")
    sub.add_argument("images", help="folder of the images")
    sub.add_argument("annotations", help="COCO instances JSON file")
    _upload_options(sub)

    sub = tree.command(tree.top, "retry", c.retry, "upload again the rows of a failure log")
    sub.add_argument("log", help="failure log written by an upload")
    sub.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="upload rows whose id already existed, with new ids",
    )
    _upload_options(sub)


def _version_commands(tree: CommandTree) -> None:
    from service.cli import commands as c

    versions = tree.section("versions", "immutable snapshots of a dataset")
    sub = tree.command(
        versions, "create", c.versions_create, "create a version and wait until ready", "dataset"
    )
    sub.add_argument("--id", dest="version_id", default="", help="id (generated when left out)")
    sub.add_argument("--description", default="")
    sub.add_argument("--no-wait", action="store_true", help="return while it is still building")
    tree.command(
        versions, "list", c.versions_list, "list a dataset's versions, newest first", "dataset"
    )
    tree.command(versions, "get", c.versions_get, "show a version", "dataset", "version")
    sub = tree.command(
        versions, "delete", c.versions_delete, "delete a version", "dataset", "version"
    )
    add_confirm_option(sub)

    sub = tree.command(
        tree.top, "export", c.export, "export a version and wait for the archive", "dataset"
    )
    _export_options(sub)
    sub.add_argument(
        "--no-embed-media", action="store_true", help="reference media instead of embedding them"
    )
    sub.add_argument("--no-progress", action="store_true")

    sub = tree.command(
        tree.top,
        "download",
        c.download,
        "export the latest version and unpack it",
        "dataset",
        "save_dir",
    )
    _export_options(sub)
    sub.add_argument("--normalized", action=argparse.BooleanOptionalAction, default=None)
    sub.add_argument("--annotations-only", action="store_true", help="no media files")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty save_dir")
    sub.add_argument("--no-progress", action="store_true")

    sub = tree.command(tree.top, "merge", c.merge, "add every input of SOURCE to DATASET")
    sub.add_argument("dataset", help="destination")
    sub.add_argument("source")


def _input_commands(tree: CommandTree) -> None:
    from service.cli import commands as c

    inputs = tree.section("inputs", "a dataset's inputs")
    sub = tree.command(inputs, "list", c.inputs_list, "list a dataset's inputs", "dataset")
    sub.add_argument("--limit", type=positive_int, default=None, help="show at most this many")
    tree.command(inputs, "get", c.inputs_get, "show an input", "dataset", "input")
    sub = tree.command(
        inputs, "delete", c.inputs_delete, "delete inputs (from every dataset)", "dataset"
    )
    sub.add_argument("inputs", nargs="+", metavar="INPUT")
    add_confirm_option(sub)
    sub = tree.command(
        inputs, "download", c.inputs_download, "download the original media", "dataset", "save_dir"
    )
    sub.add_argument("--no-progress", action="store_true")
    sub = tree.command(
        inputs,
        "reencode",
        c.inputs_reencode,
        "re-encode videos to H.264/AAC MP4 that every browser plays (a server job)",
    )
    sub.add_argument("inputs", nargs="+", metavar="INPUT")
    sub.add_argument(
        "--dry-run", action="store_true", help="only list the videos a browser could not play"
    )
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sub.add_argument("--no-progress", action="store_true")
    tree.command(inputs, "rename", c.inputs_rename, "set an input's title", "input", "title")


def main(argv: Sequence[str] | None = None) -> int:
    from service.client.errors import DatasetdError
    from service.client.exports import ArchiveIntegrityError

    args = build_parser().parse_args(argv)
    output = Output(args.json)
    handler: Handler = args.handler
    try:
        return handler(args, output)
    except DatasetdError as error:
        output.error(error)
        return 1
    except ConfirmationRefused as refused:
        output.errors.print(str(refused), highlight=False, markup=False)
        return 2
    except (TimeoutError, ArchiveIntegrityError) as error:
        # The server side did not deliver: waited too long, or damaged bytes.
        output.errors.print(f"error: {error}", highlight=False, markup=False)
        return 1
    except (ValueError, OSError, csv.Error) as error:
        # Bad local input (a path, a CSV header, split ratios): the message says what.
        output.errors.print(f"error: {error}", highlight=False, markup=False)
        return 2
    except KeyboardInterrupt:
        output.errors.print("interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
