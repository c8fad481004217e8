"""What a registry served, read from its own request log, and the per-proxy design's client.

``RegistryLog`` counts the requests a real ``docker-registry`` logged after a mark, by
kind (manifest GET/HEAD, blob GET/HEAD, the ``/v2/`` ping), with the body bytes it wrote,
so the rollout reports what the upstream actually served, whoever asked (the nodes, or
the mirror filling itself).

``fetch_own_copy`` is the design the project's seed describes: every proxy (every pod)
downloads the module itself, resolving the tag, streaming the layer, hashing it and
writing its own copy, as istio-agent does for each Envoy.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import time
from dataclasses import dataclass
from typing import Any

import requests

from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.layouts import ACCEPTED_MANIFEST_TYPES

_FIELD = {
    "method": re.compile(r"http\.request\.method=(\w+)"),
    "uri": re.compile(r'http\.request\.uri="?([^" ]+)'),
    "status": re.compile(r"http\.response\.status=(\d+)"),
    "written": re.compile(r"http\.response\.written=(\d+)"),
    "agent": re.compile(r'http\.request\.useragent="?([^"]*?)"? http'),
}
KINDS = ("manifest GET", "manifest HEAD", "blob GET", "blob HEAD", "ping", "other")


@dataclass(frozen=True)
class Served:
    method: str
    uri: str
    status: int
    written: int  # body bytes (for a HEAD, the length it announced; not counted as bytes served)
    agent: str

    @property
    def kind(self) -> str:
        if self.uri.rstrip("/") == "/v2":
            return "ping"
        what = "manifest" if "/manifests/" in self.uri else "blob" if "/blobs/" in self.uri else ""
        return f"{what} {self.method}" if what and self.method in ("GET", "HEAD") else "other"


class RegistryLog:
    """Requests a ``LocalRegistry`` logged (``msg="response completed"``), counted from a mark."""

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry

    def mark(self) -> int:
        return len(self.registry.log_lines)

    def settle(self, quiet: float = 0.5, timeout: float = 30.0) -> None:
        """Wait until the log has been quiet for ``quiet`` seconds (its reader is a thread)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            now = len(self.registry.log_lines)
            if now == last:
                return
            last = now
            time.sleep(quiet)

    def since(self, mark: int) -> list[Served]:
        served = []
        for line in self.registry.log_lines[mark:]:
            if 'msg="response completed' not in line:
                continue
            found = {name: pattern.search(line) for name, pattern in _FIELD.items()}
            if not (found["method"] and found["uri"]):
                continue
            served.append(Served(
                found["method"].group(1), found["uri"].group(1),
                int(found["status"].group(1)) if found["status"] else 0,
                int(found["written"].group(1)) if found["written"] else 0,
                found["agent"].group(1) if found["agent"] else "",
            ))  # fmt: skip
        return served


def tally(served: list[Served]) -> dict[str, Any]:
    """Counts by kind, the total, and the body bytes of the GETs (a HEAD sends no body)."""
    counts = {kind: 0 for kind in KINDS}
    for request in served:
        counts[request.kind] += 1
    return {
        "requests": counts,
        "total": len(served),
        "bytes": sum(r.written for r in served if r.method == "GET"),
        "errors": sum(1 for r in served if r.status >= 400),
    }


def fetch_own_copy(host: str, repository: str, tag: str, out: pathlib.Path, timeout: float = 120.0) -> float:
    """One proxy's own pull: manifest by tag, then the module layer streamed, hashed and written.

    Returns the seconds it took; raises on any failure or a digest that does not match.
    """
    started = time.perf_counter()
    with requests.Session() as session:
        session.trust_env = False
        manifest = session.get(f"http://{host}/v2/{repository}/manifests/{tag}",
                               headers={"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)}, timeout=timeout)  # fmt: skip
        manifest.raise_for_status()
        layer = json.loads(manifest.content)["layers"][-1]
        digest = hashlib.sha256()
        with session.get(f"http://{host}/v2/{repository}/blobs/{layer['digest']}", stream=True, timeout=timeout) as blob:
            blob.raise_for_status()
            with open(out, "wb") as handle:
                for chunk in blob.iter_content(256 * 1024):
                    digest.update(chunk)
                    handle.write(chunk)
    if f"sha256:{digest.hexdigest()}" != layer["digest"]:
        raise ValueError(f"{out}: digest mismatch")
    return time.perf_counter() - started
