"""Benchmark of a folder upload through the `datasetd` CLI, beside the same upload through
the raw generated stubs in the same run.

Starts the embedded stack (PostgreSQL + SeaweedFS) and the real server as a subprocess
(see bench/common.py), makes distinct small PNGs (64x64 random noise, ~12 KB, Pillow) in
sub-folders `cats/` and `dogs/` of a temporary folder, once, before measuring, and then
uploads the same number of images into a fresh dataset per run, two ways:

1. CLI: `python -m service --json upload folder DATASET FOLDER --labels --batch-size 32
   --concurrency 4 --no-progress` as a subprocess, with DATASETD_ADDRESS, DATASETD_APP and
   DATASETD_API_KEY of the bench server. Timed wall-clock, interpreter start-up included;
   the upload alone is the `elapsed_seconds` of its JSON result (from the first request
   to the last answer: no start-up, imports, folder scan or GetDataset check).
2. raw: the same files read from disk and sent with the generated grpc.aio stubs,
   CreateInputs of 32 inputs, 4 calls in flight, with the fields the CLI sends (id = file
   stem, image bytes, input-level concept = folder name, title = file name, the dataset):
   the same work without the client library. (The CLI also sets each call's request_id,
   a SHA-256 of the request, which the server records for idempotency; the raw run sends
   none, as a caller without retries would.)

Every run uploads its own copy of the images (new random bytes and new ids: the server
stores media content-addressed and input ids are unique within the app) into its own new
dataset, and is checked: all created, none failed, and GetDataset counts every input and
label. The order alternates (raw first in one round, CLI first in the next). CPU seconds
of the client (this process, or the CLI process), the server, PostgreSQL and the S3 server
(from /proc and getrusage) show where the time goes. The result is the ratio CLI inputs/s
/ raw inputs/s, the median over rounds.

    .venv/bin/python -m bench.bench_cli_upload            # 2 rounds of 2,000 images, ~1 min
    .venv/bin/python -m bench.bench_cli_upload --quick    # 1 round of 500 images, smoke run
    .venv/bin/python -m bench.bench_cli_upload --rounds 4 --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import grpc
from datasetd.v1 import (
    data_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    input_service_pb2,
    input_service_pb2_grpc,
)
from PIL import Image

from bench.common import (
    APP_ID,
    Cpu,
    CpuMeter,
    ServerProcess,
    announce_serving,
    environment,
    install_sigterm_handler,
    load_average,
    stack_and_server,
)

LABELS: Final = ("cats", "dogs")
SIDE: Final = 64  # pixels; RGB noise at PNG level 0 is ~12.4 KB a file
WARM_UP_IMAGES: Final = 64
CALL_TIMEOUT: Final = 120.0
CLI_TIMEOUT: Final = 900.0
HELP_TIMEOUT: Final = 60.0
MiB: Final = 1024 * 1024
CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 * MiB),
]
# The upload result's own duration (UploadResult.to_dict in service/client/upload/result.py).
ELAPSED_KEY: Final = "elapsed_seconds"


# ---------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    images: int  # per run
    batch_size: int  # inputs per CreateInputs call, both ways
    concurrency: int  # calls in flight, both ways
    json_path: Path | None


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_cli_upload",
        description="A folder upload through the datasetd CLI beside the same upload through "
        "the raw generated stubs, in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 500 images")
    parser.add_argument("--rounds", type=int, help="rounds of one CLI and one raw run (default 2)")
    parser.add_argument(
        "--images", type=int, help="images per run (default 2000; 500 with --quick)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="inputs per request, both ways (default 32)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight, both ways (default 4)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    quick: bool = args.quick
    settings = Settings(
        quick=quick,
        rounds=args.rounds if args.rounds is not None else (1 if quick else 2),
        images=args.images if args.images is not None else (500 if quick else 2000),
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        json_path=args.json,
    )
    if settings.rounds < 1 or settings.images < len(LABELS) or settings.concurrency < 1:
        parser.error("--rounds and --concurrency must be at least 1, --images at least 2")
    if not 1 <= settings.batch_size <= 128:
        parser.error("--batch-size must be between 1 and 128 (the API's maximum)")
    return settings


# ---------------------------------------------------------------------------
# Test data: folders of noise PNGs


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """A folder of distinct PNGs in `cats/` and `dogs/`, and its files in the order the
    CLI scans them (sorted relative paths), each with its label."""

    name: str
    folder: Path
    files: list[tuple[Path, str]]


def noise_png() -> bytes:
    pixels = os.urandom(SIDE * SIDE * 3)
    buffer = io.BytesIO()
    # Level 0: noise does not compress anyway, and storing is faster to make.
    Image.frombytes("RGB", (SIDE, SIDE), pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def make_set(root: Path, name: str, count: int) -> ImageSet:
    """`count` images in root/name/{cats,dogs}/, half each; the file stems (the input ids)
    start with `name`, so that no two sets share an id."""
    folder = root / name
    for label in LABELS:
        (folder / label).mkdir(parents=True)
    for n in range(count):
        label = LABELS[n % len(LABELS)]
        (folder / label / f"{name}-{n:05d}.png").write_bytes(noise_png())
    files = sorted(
        ((path, path.parent.name) for path in folder.rglob("*.png")),
        key=lambda item: item[0].relative_to(folder).parts,
    )
    return ImageSet(name, folder, files)


@dataclasses.dataclass(frozen=True)
class Data:
    warm_up: dict[str, ImageSet]  # by kind
    runs: dict[tuple[int, str], ImageSet]  # by (round, kind)
    seconds: float  # spent making them
    bytes_per_image: float


def make_data(root: Path, settings: Settings, tag: str) -> Data:
    """Every image of the bench, before anything is measured: a set per run and per
    warm-up, each with its own random bytes and ids."""
    started = time.perf_counter()
    warm_up = {kind: make_set(root, f"{tag}w{kind}", WARM_UP_IMAGES) for kind in ("raw", "cli")}
    runs = {
        (r, kind): make_set(root, f"{tag}r{r + 1}{kind}", settings.images)
        for r in range(settings.rounds)
        for kind in ("raw", "cli")
    }
    sizes = [path.stat().st_size for image_set in runs.values() for path, _ in image_set.files]
    return Data(warm_up, runs, time.perf_counter() - started, statistics.mean(sizes))


# ---------------------------------------------------------------------------
# Through the stubs: datasets, checks and the raw upload


@dataclasses.dataclass(frozen=True)
class Upload:
    """What one upload did, as it reported it."""

    created: int
    failed: int
    seconds: float  # wall-clock, as this process timed it
    upload_seconds: float | None  # the CLI's own figure: no start-up, imports or scan
    child_cpu: float  # CPU seconds of the CLI process (0 for the raw upload)


class Stubs:
    def __init__(self, channel: grpc.aio.Channel, key: str, settings: Settings) -> None:
        self._inputs = input_service_pb2_grpc.InputServiceStub(channel)
        self._datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        self._metadata = (("authorization", f"Key {key}"),)
        self._settings = settings

    async def create_dataset(self, dataset_id: str) -> None:
        reply: dataset_service_pb2.CreateDatasetResponse = await self._datasets.CreateDataset(
            dataset_service_pb2.CreateDatasetRequest(
                app_id=APP_ID,
                dataset=dataset_pb2.Dataset(id=dataset_id, description="bench_cli_upload"),
            ),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )
        if reply.dataset.id != dataset_id:
            raise RuntimeError(f"CreateDataset returned {reply.dataset.id!r}, not {dataset_id!r}")

    async def check_dataset(self, dataset_id: str, image_set: ImageSet) -> None:
        """GetDataset counts every input of the set and every label."""
        reply: dataset_service_pb2.GetDatasetResponse = await self._datasets.GetDataset(
            dataset_service_pb2.GetDatasetRequest(app_id=APP_ID, dataset_id=dataset_id),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )
        stats = reply.dataset.statistics
        expected = {label: sum(1 for _, x in image_set.files if x == label) for label in LABELS}
        found = {label: stats.concept_counts.get(label, 0) for label in LABELS}
        if stats.inputs_count != len(image_set.files) or found != expected:
            raise RuntimeError(
                f"dataset {dataset_id} holds {stats.inputs_count} inputs labelled {found}; "
                f"expected {len(image_set.files)} labelled {expected}"
            )

    def _request(
        self, dataset_id: str, files: Sequence[tuple[Path, str]]
    ) -> input_service_pb2.CreateInputsRequest:
        # Read from disk here, in the timing, as the CLI reads its files.
        request = input_service_pb2.CreateInputsRequest(app_id=APP_ID)
        for path, label in files:
            message = request.inputs.add()
            message.id = path.stem
            message.title = path.name
            message.dataset_ids.append(dataset_id)
            message.data.image.base64 = path.read_bytes()
            message.data.concepts.append(data_pb2.Concept(id=label, value=1.0))
        return request

    async def raw_upload(self, dataset_id: str, image_set: ImageSet) -> Upload:
        """CreateInputs of `batch_size` inputs, `concurrency` calls in flight."""
        size = self._settings.batch_size
        batches: Iterator[Sequence[tuple[Path, str]]] = (
            image_set.files[start : start + size] for start in range(0, len(image_set.files), size)
        )
        created = failed = 0

        async def worker() -> None:
            nonlocal created, failed
            # The workers share one iterator: each takes the next batch when its call ends.
            for files in batches:
                reply: input_service_pb2.CreateInputsResponse = await self._inputs.CreateInputs(
                    self._request(dataset_id, files), metadata=self._metadata, timeout=CALL_TIMEOUT
                )
                created += reply.created_count
                failed += reply.failed_count

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(self._settings.concurrency):
                group.create_task(worker())
        return Upload(created, failed, time.perf_counter() - started, None, 0.0)


# ---------------------------------------------------------------------------
# Through the CLI


class CliUnavailableError(RuntimeError):
    """The CLI cannot upload a folder (yet): the bench measures the raw upload alone."""


class Cli:
    def __init__(self, server: ServerProcess, work_dir: Path, settings: Settings) -> None:
        self._settings = settings
        # The CLI runs in the temporary directory, so that a failure log it may write
        # lands there and not in the checkout.
        self._cwd = work_dir
        self._env = {
            **os.environ,
            "DATASETD_ADDRESS": server.address,
            "DATASETD_APP": APP_ID,
            "DATASETD_API_KEY": server.key,
        }

    def command(self, dataset_id: str, folder: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "service",
            "--json",
            "upload",
            "folder",
            dataset_id,
            str(folder),
            "--labels",
            "--batch-size",
            str(self._settings.batch_size),
            "--concurrency",
            str(self._settings.concurrency),
            "--no-progress",
        ]

    def check_available(self) -> None:
        """`upload folder --help` works: the command exists and its modules import."""
        proc = subprocess.run(
            [sys.executable, "-m", "service", "upload", "folder", "--help"],
            cwd=self._cwd,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=HELP_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise CliUnavailableError(
                f"`python -m service upload folder --help` exited with {proc.returncode}: "
                + tail(proc.stderr or proc.stdout)
            )

    def upload(self, dataset_id: str, folder: Path) -> Upload:
        """Runs the CLI and waits for it; blocks the event loop meanwhile, which has
        nothing else to do, so that a SIGTERM or Ctrl-C reaches subprocess.run, which then
        kills the CLI."""
        # The server, PostgreSQL and SeaweedFS are alive children: RUSAGE_CHILDREN only
        # counts children that ended and were waited for, i.e. this CLI process.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(
            self.command(dataset_id, folder),
            cwd=self._cwd,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"the CLI exited with {proc.returncode} without a JSON result; stdout: "
                f"{tail(proc.stdout)}; stderr: {tail(proc.stderr)}"
            ) from None
        if not isinstance(result, dict) or "created" not in result or "failed" not in result:
            raise RuntimeError(
                f"the CLI exited with {proc.returncode} and an unexpected JSON result: "
                f"{tail(proc.stdout)}; stderr: {tail(proc.stderr)}"
            )
        created, failed = int(result["created"]), int(result["failed"])
        if proc.returncode != 0 and failed == 0:
            raise RuntimeError(f"the CLI exited with {proc.returncode}: {tail(proc.stderr)}")
        elapsed = result.get(ELAPSED_KEY)
        upload_seconds = float(elapsed) if isinstance(elapsed, (int, float)) else None
        return Upload(created, failed, seconds, upload_seconds, child_cpu)


def tail(text: str, chars: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


# ---------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass(frozen=True)
class Sample:
    round: int
    run: str  # "raw" or "cli"
    dataset_id: str
    inputs: int
    seconds: float  # wall-clock; for the CLI including interpreter start-up and exit
    inputs_per_s: float
    upload_seconds: float | None  # the CLI's own elapsed_seconds (no start-up or scan)
    upload_inputs_per_s: float | None
    client_cpu_s: float  # this process, plus the CLI process for the CLI
    server_cpu_s: float
    postgres_cpu_s: float
    s3_cpu_s: float


class Runner:
    def __init__(
        self, settings: Settings, stubs: Stubs, cli: Cli, meter: CpuMeter, tag: str
    ) -> None:
        self._settings = settings
        self._stubs = stubs
        self._cli = cli
        self._meter = meter
        self._tag = tag

    async def run(self, kind: str, image_set: ImageSet, round_index: int) -> Sample:
        dataset_id = f"{image_set.name}-{self._tag}"
        await self._stubs.create_dataset(dataset_id)
        before = self._meter.read()
        if kind == "raw":
            upload = await self._stubs.raw_upload(dataset_id, image_set)
        else:
            upload = self._cli.upload(dataset_id, image_set.folder)
        cpu: Cpu = self._meter.read() - before
        expected = len(image_set.files)
        if upload.created != expected or upload.failed:
            raise RuntimeError(
                f"{kind} upload into {dataset_id}: {upload.created} created, "
                f"{upload.failed} failed, of {expected}"
            )
        await self._stubs.check_dataset(dataset_id, image_set)
        upload_rate = (
            expected / upload.upload_seconds
            if upload.upload_seconds is not None and upload.upload_seconds > 0
            else None
        )
        return Sample(
            round=round_index,
            run=kind,
            dataset_id=dataset_id,
            inputs=expected,
            seconds=upload.seconds,
            inputs_per_s=expected / upload.seconds,
            upload_seconds=upload.upload_seconds,
            upload_inputs_per_s=upload_rate,
            client_cpu_s=cpu.client + upload.child_cpu,
            server_cpu_s=cpu.server,
            postgres_cpu_s=cpu.postgres,
            s3_cpu_s=cpu.s3,
        )


@dataclasses.dataclass
class Outcome:
    samples: list[Sample]
    cli_status: str  # "measured", "unavailable" or "failed"
    cli_note: str = ""
    data_seconds: float = 0.0
    bytes_per_image: float = 0.0


async def bench(
    settings: Settings, server: ServerProcess, meter: CpuMeter, work_dir: Path
) -> Outcome:
    tag = secrets.token_hex(3)  # no id of this run can clash with an earlier one
    print(
        f"making {settings.rounds * 2} sets of {settings.images:,} noise PNGs "
        f"({SIDE}x{SIDE}, in {'/ and '.join(LABELS)}/) ...",
        flush=True,
    )
    data = make_data(work_dir / "images", settings, tag)
    print(
        f"made in {data.seconds:.1f}s (not timed), {data.bytes_per_image / 1024:.1f} KiB each",
        flush=True,
    )
    outcome = Outcome(
        [], "measured", data_seconds=data.seconds, bytes_per_image=data.bytes_per_image
    )
    cli = Cli(server, work_dir, settings)
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        await announce_serving(channel, server)
        stubs = Stubs(channel, server.key, settings)
        runner = Runner(settings, stubs, cli, meter, tag)
        try:
            cli.check_available()
        except CliUnavailableError as error:
            outcome.cli_status, outcome.cli_note = "unavailable", str(error)
            print(f"CLI not available, measuring the raw upload alone: {error}", flush=True)
        print("warming up ...", flush=True)
        # Warms the server's pools, the S3 connections and the page cache of the CLI's
        # modules, so that the first measured run of either kind pays for none of them.
        await runner.run("raw", data.warm_up["raw"], -1)
        if outcome.cli_status == "measured":
            try:
                await runner.run("cli", data.warm_up["cli"], -1)
            except RuntimeError as error:
                outcome.cli_status, outcome.cli_note = "failed", str(error)
                print(f"CLI warm-up failed, measuring the raw upload alone: {error}", flush=True)
        print(
            f"measuring: {settings.rounds} rounds of a CLI and a raw upload of "
            f"{settings.images:,} images, {settings.batch_size} per request, "
            f"{settings.concurrency} in flight",
            flush=True,
        )
        for round_index in range(settings.rounds):
            order = ("raw", "cli") if round_index % 2 == 0 else ("cli", "raw")
            for kind in order:
                if kind == "cli" and outcome.cli_status != "measured":
                    continue
                try:
                    sample = await runner.run(kind, data.runs[round_index, kind], round_index)
                except RuntimeError as error:
                    if kind == "raw":
                        raise
                    outcome.cli_status, outcome.cli_note = "failed", str(error)
                    print(f"  CLI upload failed: {error}", flush=True)
                    continue
                outcome.samples.append(sample)
                print(f"  {format_sample(sample)}", flush=True)
    return outcome


# ---------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Comparison:
    rounds: int
    cli_rate: float  # median inputs/s, wall-clock with interpreter start-up
    raw_rate: float
    ratio: float  # median of per-round ratios
    ratio_min: float
    ratio_max: float
    cli_upload_rate: float | None  # median inputs/s of the CLI's own elapsed_seconds
    upload_ratio: float | None
    upload_ratio_min: float | None
    upload_ratio_max: float | None
    startup_s: float | None  # median wall-clock minus elapsed_seconds


def compare(samples: Sequence[Sample]) -> Comparison | None:
    by_round: dict[int, dict[str, Sample]] = {}
    for s in samples:
        by_round.setdefault(s.round, {})[s.run] = s
    pairs = [(r["cli"], r["raw"]) for r in by_round.values() if "cli" in r and "raw" in r]
    if not pairs:
        return None
    ratios = [c.inputs_per_s / r.inputs_per_s for c, r in pairs]
    upload_pairs = [(c, r) for c, r in pairs if c.upload_inputs_per_s is not None]
    upload_ratios = [
        c.upload_inputs_per_s / r.inputs_per_s
        for c, r in upload_pairs
        if c.upload_inputs_per_s is not None
    ]
    startups = [c.seconds - c.upload_seconds for c, _ in pairs if c.upload_seconds is not None]
    upload_rates = [c.upload_inputs_per_s for c, _ in pairs if c.upload_inputs_per_s is not None]
    return Comparison(
        rounds=len(pairs),
        cli_rate=statistics.median(c.inputs_per_s for c, _ in pairs),
        raw_rate=statistics.median(r.inputs_per_s for _, r in pairs),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        cli_upload_rate=statistics.median(upload_rates) if upload_rates else None,
        upload_ratio=statistics.median(upload_ratios) if upload_ratios else None,
        upload_ratio_min=min(upload_ratios) if upload_ratios else None,
        upload_ratio_max=max(upload_ratios) if upload_ratios else None,
        startup_s=statistics.median(startups) if startups else None,
    )


HEADER: Final = (
    f"{'round':<6}{'run':<5}{'inputs':>8}{'seconds':>9}{'inputs/s':>10}"
    f"  CPU s:{'client':>7}{'server':>8}{'pg':>7}{'s3':>7}"
)


def format_sample(s: Sample) -> str:
    line = (
        f"{s.round + 1:<6}{'CLI' if s.run == 'cli' else 'raw':<5}{s.inputs:>8,}{s.seconds:>9.2f}"
        f"{s.inputs_per_s:>10,.0f}  {'':6}{s.client_cpu_s:7.2f}{s.server_cpu_s:8.2f}"
        f"{s.postgres_cpu_s:7.2f}{s.s3_cpu_s:7.2f}"
    )
    if s.upload_seconds is not None and s.upload_inputs_per_s is not None:
        line += (
            f"   (upload alone {s.upload_seconds:.2f}s = {s.upload_inputs_per_s:,.0f} inputs/s, "
            f"start-up, scan and exit {s.seconds - s.upload_seconds:.2f}s)"
        )
    return line


def format_report(
    outcome: Outcome, found: Comparison | None, settings: Settings, load_before: float
) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    lines += [format_sample(s) for s in outcome.samples]
    lines += ["", "CLI vs raw stubs (CLI inputs/s / raw inputs/s, median of per-round ratios):"]
    if found is not None:
        lines.append(
            f"  wall-clock, interpreter start-up included: CLI {found.cli_rate:,.0f} inputs/s "
            f"vs raw {found.raw_rate:,.0f} inputs/s: {found.ratio:.2f}x "
            f"({found.ratio_min:.2f}..{found.ratio_max:.2f})"
        )
        if found.upload_ratio is not None and found.cli_upload_rate is not None:
            lines.append(
                f"  upload alone (the CLI's elapsed_seconds): CLI {found.cli_upload_rate:,.0f} "
                f"inputs/s vs raw {found.raw_rate:,.0f} inputs/s: {found.upload_ratio:.2f}x "
                f"({found.upload_ratio_min:.2f}..{found.upload_ratio_max:.2f}); the rest of "
                f"the CLI's wall-clock (start-up, imports, folder scan, exit) "
                f"{found.startup_s:.2f}s"
            )
        else:
            lines.append("  upload alone: the CLI's JSON result gives no elapsed_seconds")
    elif outcome.cli_status != "measured":
        lines.append(f"  CLI {outcome.cli_status}: {outcome.cli_note}")
    else:
        lines.append("  no round measured both")
    cli_note = "" if outcome.cli_status == "measured" else f" (CLI {outcome.cli_status})"
    lines += [
        "",
        f"{settings.rounds} rounds{cli_note} of {settings.images:,} distinct {SIDE}x{SIDE} noise "
        f"PNGs ({outcome.bytes_per_image / 1024:.1f} KiB each) per run, each run into a new "
        f"dataset; {settings.batch_size} inputs per CreateInputs, {settings.concurrency} in "
        "flight, both ways; the order alternates.",
        "CPU seconds per run: client = this bench process (raw gRPC client; idle during a "
        "CLI run) plus the CLI process, server = the datasetd process, pg = postmaster and "
        "its backends, s3 = the SeaweedFS server.",
        f"The machine has {os.cpu_count()} cores shared by all four; differences under ~30% "
        "are noise.",
        f"Load average (1 min) before the run {load_before:.2f}, after {load_average():.2f}: "
        "other work on the machine lowers the absolute figures more than the ratios.",
    ]
    return "\n".join(lines)


def write_json(
    path: Path,
    settings: Settings,
    outcome: Outcome,
    found: Comparison | None,
    load_before: float,
) -> None:
    document = {
        "benchmark": "bench_cli_upload",
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(settings).items()
        },
        "environment": environment(load_before),
        "cli": {"status": outcome.cli_status, "note": outcome.cli_note},
        "bytes_per_image": outcome.bytes_per_image,
        "comparison": dataclasses.asdict(found) if found is not None else None,
        "samples": [dataclasses.asdict(s) for s in outcome.samples],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    install_sigterm_handler()
    load_before = load_average()
    started = time.monotonic()
    with stack_and_server(started) as running:
        stack = running.stack
        meter = CpuMeter(running.server.pid, stack.postgres.pid, stack.s3.pid)
        outcome = asyncio.run(bench(settings, running.server, meter, running.work_dir))
    found = compare(outcome.samples)
    print()
    print(format_report(outcome, found, settings, load_before))
    if settings.json_path is not None:
        write_json(settings.json_path, settings, outcome, found, load_before)
        print(f"\nJSON results written to {settings.json_path}")
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    return 0 if outcome.cli_status == "measured" else 1


if __name__ == "__main__":
    raise SystemExit(main())
