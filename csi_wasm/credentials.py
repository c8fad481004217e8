"""Registry credentials: from a pod's nodePublishSecretRef or a node-wide docker config file.

Credentials are never logged: ``Credentials`` hides the password from repr, and
logs carry at most the registry host and whether credentials were used.

A pod's Secret is untrusted input: any shape that is not what the docker config
format says (deep nesting, an ``auth`` that is not a base64 string of
``user:password``, a username or password that is not a string, two keys naming
one registry) is InvalidRequest with a message saying which, never a crash.
Registry keys are canonicalized like references (``reference.canonical_host``):
``https://GHCR.IO/v1/`` and ``ghcr.io:443`` are ``ghcr.io``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from csi_wasm.config import ConfigError
from csi_wasm.errors import InvalidRequest
from csi_wasm.reference import InvalidHost, canonical_host


# Registry tokens used as passwords run to a few KiB; no registry front accepts a header near this.
MAX_CREDENTIAL_CHARS = 64 * 1024


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

    by_host: Mapping[str, Credentials] = field(default_factory=dict)  # canonical host -> credentials

    def lookup(self, registry: str) -> Credentials | None:
        return self.by_host.get(_normalise(registry))


def keychain_from_secrets(secrets: Mapping[str, str], registry: str) -> Credentials | None:
    """Credentials from a pod's secret data, or None if the pod sent none.

    Accepts a ``kubernetes.io/dockerconfigjson`` Secret (``.dockerconfigjson``),
    the legacy ``kubernetes.io/dockercfg`` (``.dockercfg``), or ``username``/``password`` keys.
    """
    if not secrets:
        return None
    if "username" in secrets or "password" in secrets:
        username, password = secrets.get("username"), secrets.get("password")
        if not isinstance(username, str) or not username or not isinstance(password, str):
            raise InvalidRequest("nodePublishSecretRef: a secret with 'username' needs 'password' too")
        return _bounded(username, password, "nodePublishSecretRef", "")
    if ".dockerconfigjson" in secrets:
        auths = _json(secrets[".dockerconfigjson"], ".dockerconfigjson").get("auths", {})
        return parse_auths(auths, ".dockerconfigjson").lookup(registry)
    if ".dockercfg" in secrets:
        return parse_auths(_json(secrets[".dockercfg"], ".dockercfg"), ".dockercfg").lookup(registry)
    raise InvalidRequest(
        "nodePublishSecretRef: expected keys .dockerconfigjson, .dockercfg, or username and password "
        f"(got {', '.join(sorted(secrets))[:200]})"
    )


def load_docker_config(path: pathlib.Path) -> Keychain:
    """The node-wide credentials (``docker_config``); ConfigError names what is wrong with the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"docker_config: cannot read {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"docker_config: {path} is not a JSON object")
    try:
        return parse_auths(data.get("auths", {}), str(path))
    except InvalidRequest as exc:
        raise ConfigError(f"docker_config: {exc}") from None


def parse_auths(auths: Any, where: str) -> Keychain:
    if not isinstance(auths, dict):
        raise InvalidRequest(f"{where}: 'auths' must be a mapping of registry to credentials")
    by_host: dict[str, Credentials] = {}
    spelled: dict[str, str] = {}
    for host, entry in auths.items():
        creds = _entry(entry, where, _shown(host))
        if creds is None:
            continue
        key = _normalise(host)
        if key in by_host and by_host[key] != creds:
            raise InvalidRequest(
                f"{where}: entries {_shown(spelled[key])} and {_shown(host)} name the same registry ({_shown(key)}) "
                "with different credentials; keep one"
            )
        by_host[key], spelled[key] = creds, host
    return Keychain(by_host)


def _entry(entry: Any, where: str, host: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where}: entry for {host} is not a mapping")
    username, password, auth = entry.get("username"), entry.get("password"), entry.get("auth")
    if username is not None or password is not None:
        if not isinstance(username, str) or not isinstance(password, str):
            raise InvalidRequest(f"{where}: 'username' and 'password' for {host} must both be strings")
        if username:
            return _bounded(username, password, where, f" for {host}")
    if auth is None or auth == "":
        return None
    if not isinstance(auth, str):
        raise InvalidRequest(f"{where}: 'auth' for {host} must be a string (base64 of user:password)")
    try:
        user, colon, secret = base64.b64decode(auth, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(f"{where}: 'auth' for {host} is not base64 of user:password") from None
    if not colon or not user:
        raise InvalidRequest(f"{where}: 'auth' for {host} decodes to no user:password pair")
    return _bounded(user, secret, where, f" for {host}")


def _bounded(username: str, password: str, where: str, entry: str) -> Credentials:
    """Credentials that fit in a request header. Longer ones are refused by the registry's front (HTTP 431
    or 400), which reads as a registry failure and is retried for ever; here the Secret is named instead."""
    for name, value in (("username", username), ("password", password)):
        if len(value) > MAX_CREDENTIAL_CHARS:
            raise InvalidRequest(
                f"{where}: the {name}{entry} is {len(value)} characters; at most {MAX_CREDENTIAL_CHARS} fit in a "
                "request header (is the Secret the right one?)"
            )
    return Credentials(username, password)


def _normalise(host: str) -> str:
    """A docker config key (``https://ghcr.io/v1/``, ``GHCR.IO:443``) as a canonical registry host.

    A key that is no valid host stays as written: it then matches no reference (references are
    always valid), which is what docker does with it too.
    """
    bare = host.strip()
    for scheme in ("https://", "http://"):
        if bare[: len(scheme)].lower() == scheme:
            bare = bare[len(scheme) :]
    bare = bare.split("/", 1)[0]
    try:
        return canonical_host(bare)
    except InvalidHost:
        return host


def _shown(host: str) -> str:
    return repr(host[:100])


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except RecursionError:
        raise InvalidRequest(f"nodePublishSecretRef: {where} is nested too deeply to be a docker config") from None
    except ValueError:
        raise InvalidRequest(f"nodePublishSecretRef: {where} is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"nodePublishSecretRef: {where} is not a JSON object")
    return data
