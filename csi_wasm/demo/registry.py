"""Run Debian's ``docker-registry`` (the CNCF distribution registry) on 127.0.0.1 for demos and tests."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass

import requests

import yaml

_LISTENING = re.compile(r"listening on (?:\[::\]|127\.0\.0\.1|[\d.]+):(\d+)")
BINARY = "docker-registry"


@dataclass(frozen=True)
class RegistryAuth:
    username: str
    password: str


class LocalRegistry:
    """A real registry process. ``host`` is ``127.0.0.1:<port>``; ``log_lines`` records its requests.

    With ``proxy_remote`` (``http://host:port`` of another registry) it runs as a pull-through
    cache of that registry: distribution's ``proxy: remoteurl:`` mode, read-only, filled on demand.
    """

    def __init__(
        self,
        workdir: pathlib.Path,
        auth: RegistryAuth | None = None,
        tls: tuple[pathlib.Path, pathlib.Path] | None = None,
        proxy_remote: str | None = None,
    ) -> None:
        if shutil.which(BINARY) is None:
            raise RuntimeError(f"{BINARY} not found: apt-get install -y docker-registry")
        self.workdir = workdir
        self.auth = auth
        self.tls = tls
        self.proxy_remote = proxy_remote
        self.log_lines: list[str] = []
        self._process: subprocess.Popen[str] | None = None
        self._port: int | None = None
        self._lock = threading.Lock()
        self._logged = threading.Condition(self._lock)

    @property
    def host(self) -> str:
        assert self._port is not None, "registry not started"
        return f"127.0.0.1:{self._port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(self, timeout: float = 10.0) -> LocalRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        http: dict[str, object] = {"addr": "127.0.0.1:0", "secret": "csi-wasm-demo"}
        if self.tls:
            http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")}, "delete": {"enabled": True}},
            "http": http,
        }
        if self.proxy_remote:
            config["proxy"] = {"remoteurl": self.proxy_remote}
        if self.auth:
            config["auth"] = {"htpasswd": {"realm": "csi-wasm", "path": str(self._htpasswd())}}
        config_path = self.workdir / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        self._process = subprocess.Popen(
            [BINARY, "serve", str(config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        ready = threading.Event()
        threading.Thread(target=self._read_log, args=(ready,), daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"{BINARY} did not report its port within {timeout}s: {self.log_lines[-5:]}")
        return self

    def _read_log(self, ready: threading.Event) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            with self._lock:
                self.log_lines.append(line)
                self._logged.notify_all()
            match = _LISTENING.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                ready.set()

    def _htpasswd(self) -> pathlib.Path:
        assert self.auth is not None
        if shutil.which("htpasswd") is None:
            raise RuntimeError("htpasswd not found: apt-get install -y apache2-utils")
        line = subprocess.run(
            ["htpasswd", "-Bbn", self.auth.username, self.auth.password], check=True, capture_output=True, text=True
        ).stdout.strip()
        path = self.workdir / "htpasswd"
        path.write_text(line + "\n")
        return path

    def sync(self, timeout: float = 30.0) -> None:
        """Wait until the requests the registry answered before now are in ``log_lines``.

        The log is read by a thread, so a count taken right after a response can miss its line. A request
        of our own, made now, is logged after those: once its line is here, so are theirs.
        """
        marker = f"csi-wasm-sync-{uuid.uuid4().hex}"
        with self._lock:
            start = len(self.log_lines)
        verify: bool | str = str(self.tls[0]) if self.tls else True
        requests.get(f"{self.scheme}://{self.host}/v2/{marker}/manifests/sync", verify=verify, timeout=timeout)
        with self._logged:
            if not self._logged.wait_for(lambda: any(marker in line for line in self.log_lines[start:]), timeout):
                raise RuntimeError(f"{BINARY} did not log the sync request within {timeout}s")

    def requests_matching(self, pattern: str) -> int:
        """How many requests the registry logged whose line matches ``pattern`` (e.g. a blob GET)."""
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.log_lines if regex.search(line))

    def blob_gets(self, repository: str, digest: str) -> int:
        """How many GETs of one blob the registry has completed (its access log, not our counters)."""
        return self.requests_matching(
            rf'msg="response completed".*http\.request\.method=GET .*http\.request\.uri="?/v2/{re.escape(repository)}/blobs/{re.escape(digest)}'
        )

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
