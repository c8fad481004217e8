"""Registry credentials: from a pod's nodePublishSecretRef or a node-wide docker config file.

Credentials are never logged: ``Credentials`` hides the password from repr, and
logs carry at most the registry host and whether credentials were used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from csi_wasm.errors import InvalidRequest

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """Stable, non-reversible identity of these credentials (for cache keys, never logs)."""
        return hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


@dataclass(frozen=True)
class Keychain:
    """Credentials by registry host, in the docker config.json shape."""

    by_host: Mapping[str, Credentials] = field(default_factory=dict)

    def lookup(self, registry: str) -> Credentials | None:
        candidates = (registry,) + (DOCKER_HUB_KEYS if registry == "docker.io" else ())
        for key in candidates:
            if key in self.by_host:
                return self.by_host[key]
        return None


def keychain_from_secrets(secrets: Mapping[str, str], registry: str) -> Credentials | None:
    """Credentials from a pod's secret data, or None if the pod sent none.

    Accepts a ``kubernetes.io/dockerconfigjson`` Secret (``.dockerconfigjson``),
    the legacy ``kubernetes.io/dockercfg`` (``.dockercfg``), or ``username``/``password`` keys.
    """
    if not secrets:
        return None
    if "username" in secrets or "password" in secrets:
        if not secrets.get("username") or "password" not in secrets:
            raise InvalidRequest("nodePublishSecretRef: a secret with 'username' needs 'password' too")
        return Credentials(secrets["username"], secrets["password"])
    if ".dockerconfigjson" in secrets:
        auths = _json(secrets[".dockerconfigjson"], ".dockerconfigjson").get("auths", {})
        return parse_auths(auths, ".dockerconfigjson").lookup(_normalise(registry))
    if ".dockercfg" in secrets:
        return parse_auths(_json(secrets[".dockercfg"], ".dockercfg"), ".dockercfg").lookup(_normalise(registry))
    raise InvalidRequest(
        "nodePublishSecretRef: expected keys .dockerconfigjson, .dockercfg, or username and password "
        f"(got {', '.join(sorted(secrets))})"
    )


def load_docker_config(path: pathlib.Path) -> Keychain:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read docker config {path}: {exc}") from exc
    return parse_auths(data.get("auths", {}), str(path))


def parse_auths(auths: Any, where: str) -> Keychain:
    if not isinstance(auths, dict):
        raise InvalidRequest(f"{where}: 'auths' must be a mapping of registry to credentials")
    by_host: dict[str, Credentials] = {}
    for host, entry in auths.items():
        creds = _entry(entry, where, host)
        if creds is not None:
            by_host[_normalise(host)] = creds
    return Keychain(by_host)


def _entry(entry: Any, where: str, host: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where}: entry for {host} is not a mapping")
    if entry.get("username") and "password" in entry:
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"{where}: 'auth' for {host} is not base64 of user:password") from exc
        return Credentials(user, password)
    return None


def _normalise(host: str) -> str:
    host = host.removeprefix("https://").removeprefix("http://")
    host = host.split("/", 1)[0]
    return "docker.io" if host in DOCKER_HUB_KEYS else host


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"nodePublishSecretRef: {where} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"nodePublishSecretRef: {where} is not a JSON object")
    return data
