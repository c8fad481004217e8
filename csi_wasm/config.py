"""Configuration: frozen dataclasses, built by the CLI from flags and the node config file.

Security-relevant settings (plain-HTTP registries, CA bundles, mirrors, size caps)
live only here, in node configuration an admin controls, never in volume
attributes that any pod author can set.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import yaml

from csi_wasm.errors import InvalidRequest
from csi_wasm.reference import DOCKER_HUB, InvalidHost, canonical_host, parse_reference

MiB = 1024 * 1024
_DRIVER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class ConfigError(ValueError):
    """The node configuration is invalid; the message names the bad key."""


class UsageError(ConfigError):
    """A flag, an environment variable or a path the operator gave is wrong; the message names it."""


@dataclass(frozen=True)
class RegistryHostConfig:
    """Per-registry settings, keyed by registry host[:port] (canonical: see ``reference.canonical_host``)."""

    insecure: bool = False  # plain HTTP; only for hosts an admin names
    ca_bundle: str | None = None  # extra CA bundle (PEM file) to verify this host
    mirrors: tuple[str, ...] = ()  # hosts tried in order before the upstream
    require_signature: bool = False  # a module must carry a cosign signature by cosign_public_key
    cosign_public_key: str | None = None  # PEM file: ECDSA P-256 public key (cosign's default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirrors", tuple(_canonical_mirror(m, "mirrors") for m in self.mirrors))


@dataclass(frozen=True)
class PullConfig:
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0
    download_timeout_seconds: float = 600.0  # a whole blob; downloads outlive the call
    attempts: int = 3  # for transient failures only (connection refused/reset, 5xx, 429)
    max_manifest_bytes: int = 4 * MiB
    max_module_bytes: int = 256 * MiB
    tag_cache_seconds: float = 300.0
    max_concurrent_downloads: int = 4
    # of which one registry may run at once (the others wait their turn, csi_wasm.downloads): a registry
    # that drips its blobs cannot take every download slot from the others
    max_concurrent_downloads_per_registry: int = 2
    # How long one publish waits for a download before answering UNAVAILABLE (the download goes on
    # and kubelet's retry joins it): keeps every answer well inside kubelet's 2-minute call timeout.
    max_wait_seconds: float = 60.0
    # Registry answers read whole (manifests, tokens, signature payloads) that all publishes together may
    # hold in memory, each counted at its worst case while parsed (csi_wasm.registry.bodies).
    max_buffered_bytes: int = 64 * MiB
    # Publishes that may wait on registries at once (resolving, downloading or waiting for a download), in
    # all and per registry; the next answers UNAVAILABLE at once (csi_wasm.admission). The gRPC server
    # keeps workers beyond these for Probe, unpublish and publishes of stored modules.
    max_pulling_publishes: int = 96
    max_pulling_publishes_per_registry: int = 64


@dataclass(frozen=True)
class StoreConfig:
    gc_grace_seconds: float = 24 * 3600.0
    gc_interval_seconds: float = 600.0
    max_store_bytes: int = 0  # 0: no cap
    min_free_bytes: int = 512 * MiB
    auth_cache_seconds: float = 300.0


@dataclass(frozen=True)
class NodeConfig:
    """What the node config file (``--config``, usually a ConfigMap) holds."""

    registries: Mapping[str, RegistryHostConfig] = field(default_factory=dict)
    pull: PullConfig = field(default_factory=PullConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    docker_config: str | None = None  # node-wide credentials (docker config.json)
    prepull: tuple[str, ...] = ()
    # Which images pods may use: "host/path" patterns, "*" within one path component,
    # "**" across components (csi_wasm.policy). Empty: every image is allowed.
    allowed_images: tuple[str, ...] = ()
    # Private blocks (CIDR) a registry may redirect to or name as its token realm even
    # when the registry itself is not in them (csi_wasm.registry.refuse_forbidden_host).
    allowed_private_networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Keys are canonical however the config was built (file, flags, tests), so a lookup by any
        # spelling of a host finds its settings: ``require_signature`` for ghcr.io holds for GHCR.IO.
        object.__setattr__(self, "registries", canonical_registries(self.registries))

    def registry(self, host: str) -> RegistryHostConfig:
        """The settings for ``host``, by its canonical form; the defaults for a host not configured
        (or not a valid host, which no request ever reaches)."""
        try:
            key = canonical_host(host)
        except InvalidHost:
            return RegistryHostConfig()
        return self.registries.get(key, RegistryHostConfig())

    def with_insecure(self, hosts: list[str]) -> NodeConfig:
        """Mark ``hosts`` (``--insecure-registry``) plain HTTP; raise ConfigError for a bad host."""
        merged = dict(self.registries)
        for host in hosts:
            key = _canonical(host, "--insecure-registry")
            merged[key] = replace(merged.get(key, RegistryHostConfig()), insecure=True)
        return replace(self, registries=merged)


def canonical_registries(registries: Mapping[str, RegistryHostConfig]) -> dict[str, RegistryHostConfig]:
    """``registries`` keyed by canonical host; two keys naming one host are a ConfigError."""
    canonical: dict[str, RegistryHostConfig] = {}
    spelled: dict[str, str] = {}
    for host, settings in registries.items():
        key = _canonical(host, f"registries.{host}")
        if key in canonical:
            raise ConfigError(
                f"registries.{host}: names the same registry as registries.{spelled[key]} ({key}); keep one"
            )
        canonical[key], spelled[key] = settings, host
    return canonical


def _canonical(host: str, where: str) -> str:
    try:
        return canonical_host(host)
    except InvalidHost as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _canonical_mirror(host: str, where: str) -> str:
    key = _canonical(host, where)
    if key == DOCKER_HUB:
        raise ConfigError(f"{where}: {host!r} is Docker Hub, which cannot serve as a mirror of another registry")
    return key


@dataclass(frozen=True)
class DriverConfig:
    driver_name: str
    node_id: str
    endpoint: str
    state_dir: pathlib.Path
    kubelet_dir: pathlib.Path
    node: NodeConfig = field(default_factory=NodeConfig)

    def __post_init__(self) -> None:
        if not _DRIVER_NAME.match(self.driver_name):
            raise UsageError(
                f"--driver-name {self.driver_name!r}: 1-63 characters, letters, digits, '-', '.', '_', "
                "beginning and ending with a letter or digit"
            )
        if not self.node_id:
            raise UsageError("--node-id is empty: pass --node-id or set NODE_ID (the DaemonSet sets it to spec.nodeName)")

    @property
    def socket_path(self) -> str:
        return socket_path_of(self.endpoint)


def socket_path_of(endpoint: str) -> str:
    """``unix:///csi/csi.sock``, ``unix:/csi/csi.sock`` or a bare path -> the path."""
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            endpoint = endpoint[len(prefix) :]
            break
    if not endpoint.startswith("/"):
        raise UsageError(f"--endpoint {endpoint!r}: expected unix:///absolute/path/to/csi.sock")
    return endpoint


def load_node_config(path: pathlib.Path) -> NodeConfig:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read node config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read node config {path}: {_yaml_problem(exc)}") from exc
    return parse_node_config(raw)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, on one line: PyYAML's own text spans several, quoting the file."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(exc, "problem", None) or type(exc).__name__)


def parse_node_config(raw: Any) -> NodeConfig:
    data = _mapping(raw, "config")
    _reject_unknown(data, NodeConfig, "config")
    registries = {
        str(host): _registry(value, f"registries.{host}")
        for host, value in _mapping(data.get("registries", {}), "registries").items()
    }
    return NodeConfig(
        registries=registries,
        pull=_section(data.get("pull", {}), PullConfig, "pull"),
        store=_section(data.get("store", {}), StoreConfig, "store"),
        docker_config=_optional_str(data.get("docker_config"), "docker_config"),
        prepull=_prepull(data.get("prepull", [])),
        allowed_images=_image_patterns(data.get("allowed_images", [])),
        allowed_private_networks=_networks(data.get("allowed_private_networks", [])),
    )


def _prepull(raw: Any) -> tuple[str, ...]:
    """References checked here: a typo is an error at start, not a warning in the log after it."""
    images = _str_list(raw, "prepull")
    for index, image in enumerate(images):
        try:
            parse_reference(image)
        except InvalidRequest as exc:
            raise ConfigError(f"prepull[{index}]: {exc}") from None
    return tuple(images)


def _image_patterns(raw: Any) -> tuple[str, ...]:
    from csi_wasm.policy import validate_pattern  # policy imports nothing from here at module level

    patterns = _str_list(raw, "allowed_images")
    for index, pattern in enumerate(patterns):
        problem = validate_pattern(pattern)
        if problem:
            raise ConfigError(f"allowed_images[{index}] {pattern!r}: {problem}")
    return tuple(patterns)


_NEVER_ALLOWED = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


def _networks(raw: Any) -> tuple[str, ...]:
    networks = _str_list(raw, "allowed_private_networks")
    for index, text in enumerate(networks):
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise ConfigError(f"allowed_private_networks[{index}] {text!r}: not a CIDR block ({exc})") from exc
        if any(network.overlaps(never) for never in _NEVER_ALLOWED if never.version == network.version):
            raise ConfigError(
                f"allowed_private_networks[{index}] {text!r}: link-local/metadata addresses cannot be allowed"
            )
    return tuple(str(ipaddress.ip_network(text, strict=False)) for text in networks)


def _registry(raw: Any, where: str) -> RegistryHostConfig:
    data = _mapping(raw, where)
    _reject_unknown(data, RegistryHostConfig, where)
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}.insecure: expected true or false, got {insecure!r}")
    require_signature = data.get("require_signature", False)
    if not isinstance(require_signature, bool):
        raise ConfigError(f"{where}.require_signature: expected true or false, got {require_signature!r}")
    key = _optional_str(data.get("cosign_public_key"), f"{where}.cosign_public_key")
    if require_signature and not key:
        raise ConfigError(f"{where}.require_signature: needs cosign_public_key (a PEM file)")
    mirrors = _str_list(data.get("mirrors", []), f"{where}.mirrors")
    return RegistryHostConfig(
        insecure=insecure,
        ca_bundle=_optional_str(data.get("ca_bundle"), f"{where}.ca_bundle"),
        mirrors=tuple(_canonical_mirror(mirror, f"{where}.mirrors") for mirror in mirrors),
        require_signature=require_signature,
        cosign_public_key=key,
    )


# Where 0 would not switch something off but stop the driver working: a collector that never sleeps,
# requests that time out before they start, limits no manifest or module fits under, every cold publish
# refused. (0 attempts or download workers count as 1.)
_ABOVE_ZERO = {
    "pull": ("connect_timeout_seconds", "read_timeout_seconds", "download_timeout_seconds", "max_manifest_bytes",
             "max_module_bytes", "max_buffered_bytes", "max_pulling_publishes", "max_pulling_publishes_per_registry"),
    "store": ("gc_interval_seconds",),
}  # fmt: skip


def _section(raw: Any, cls: type, where: str) -> Any:
    data = _mapping(raw, where)
    _reject_unknown(data, cls, where)
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in data.items():
        expected = type(getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}.{key}: must not be negative, got {value!r}")
        if value == 0 and key in _ABOVE_ZERO.get(where, ()):
            raise ConfigError(f"{where}.{key}: must be above 0, got {value!r}")
        values[key] = expected(value)
    return cls(**values)


def _mapping(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    return raw


def _reject_unknown(data: Mapping[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")


def _optional_str(raw: Any, where: str) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    raise ConfigError(f"{where}: expected a string, got {raw!r}")


def _str_list(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ConfigError(f"{where}: expected a list of strings, got {raw!r}")
    return raw


def check_files(config: NodeConfig) -> None:
    """Fail at start, naming the key, when a file the node config points at cannot be read.

    Otherwise a missing CA bundle or key would surface only at the first publish, as an error
    the pod's owner cannot act on.
    """
    named = [("docker_config", config.docker_config)]
    for host, registry in config.registries.items():
        named += [(f"registries.{host}.ca_bundle", registry.ca_bundle),
                  (f"registries.{host}.cosign_public_key", registry.cosign_public_key)]  # fmt: skip
    for key, path in named:
        if path is None:
            continue
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc


def describe(config: NodeConfig) -> str:
    """A loggable one-line summary (the config holds no secrets, only file names)."""
    return json.dumps(
        {
            "registries": {h: vars(c) | {"mirrors": list(c.mirrors)} for h, c in config.registries.items()},
            "pull": vars(config.pull),
            "store": vars(config.store),
            "prepull": list(config.prepull),
            "allowed_images": list(config.allowed_images),
            "allowed_private_networks": list(config.allowed_private_networks),
        },
        sort_keys=True,
    )
