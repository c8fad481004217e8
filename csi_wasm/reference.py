"""Parse and validate OCI image references (the grammar of distribution/reference).

A pod author writes the reference, so it is untrusted input: anything that is
not a well-formed reference is refused before the driver touches the network.

Registry hosts are canonical (``canonical_host``), here and nowhere else: every
lookup keyed by a host (node configuration, signature requirements, the
allow-list, credentials, the tag cache, access records) sees one spelling per
registry, so ``GHCR.IO`` or ``ghcr.io:443`` cannot slip past a rule written for
``ghcr.io``. The canonical form is lower case, without the default port 443, with
IPv6 literals compressed, and ``docker.io`` for Docker Hub's aliases
(``index.docker.io``, ``registry-1.docker.io``). Numeric hosts that are not plain
dotted quads (``127.1``, ``0x7f.0.0.1``, ``2130706433``, ``127.000.000.001``) are
refused: the resolver reads them as addresses no rule was written for.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

from csi_wasm.errors import InvalidRequest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_API_HOST})
DEFAULT_PORT = 443
MAX_NAME_LENGTH = 255
MAX_REFERENCE_LENGTH = 1024

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# Every pattern is used with fullmatch and re.ASCII: "$" would accept a trailing newline
# and "\w" would accept any Unicode letter, and both would reach URLs and file names.
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::([0-9]{{1,5}}))?", re.ASCII
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}", re.ASCII)


class InvalidHost(ValueError):
    """A registry host that is not a well-formed host[:port]."""


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """The one spelling of a registry host; raise InvalidHost if it is not a host[:port].

    Lower case, no default port (443), compressed IPv6 literals, ``docker.io`` for
    Docker Hub's aliases. Idempotent: ``canonical_host(canonical_host(h)) == canonical_host(h)``.
    """
    match = _DOMAIN.fullmatch(host)
    if not match:
        raise InvalidHost(f"{host[:100]!r} is not a registry host[:port]")
    port_text = match.group(1)
    name = host[: len(host) - len(port_text) - 1] if port_text is not None else host
    port = int(port_text) if port_text is not None else None
    if port is not None and not 0 < port <= 65535:
        raise InvalidHost(f"{host[:100]!r}: port {port_text} is out of range")
    if name.startswith("["):
        try:
            name = f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            raise InvalidHost(f"{host[:100]!r}: {name} is not an IPv6 address") from None
    else:
        name = name.lower()
        _refuse_ambiguous_ipv4(name, host)
    if port is not None and port != DEFAULT_PORT:
        name = f"{name}:{port}"
    return DOCKER_HUB if name in DOCKER_HUB_ALIASES else name


def _refuse_ambiguous_ipv4(name: str, original: str) -> None:
    try:
        packed = socket.inet_aton(name)  # the C resolver's reading: 127.1, 0x7f.1, 2130706433 ...
    except OSError:
        return  # a name, not an address
    dotted = str(ipaddress.IPv4Address(packed))
    if dotted != name:
        raise InvalidHost(f"{original[:100]!r}: a numeric host must be written as a plain dotted quad ({dotted}?)")


def api_host(registry: str) -> str:
    """Where a canonical registry's API is served (Docker Hub's is not docker.io itself)."""
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


@dataclass(frozen=True)
class Reference:
    """A validated reference. ``digest`` pins content; ``tag`` is a mutable name.

    ``registry`` is always canonical (``canonical_host``), however the reference was made.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "registry", canonical_host(self.registry))
        except InvalidHost as exc:
            raise InvalidRequest(f"invalid registry host: {exc}") from None

    @property
    def api_host(self) -> str:
        """The host:port to send registry API requests to."""
        return api_host(self.registry)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_key(self) -> str:
        """What to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_sha256_digest(value: str) -> bool:
    return bool(_DIGEST.fullmatch(value))


def parse_reference(text: str) -> Reference:
    """Parse ``[registry/]repository[:tag][@sha256:hex]``; raise InvalidRequest otherwise."""
    if not text or len(text) > MAX_REFERENCE_LENGTH or text != text.strip():
        raise InvalidRequest(f"image {text[:80]!r} is not a valid OCI reference: empty, too long or padded")
    remainder, digest = _split_digest(text)
    remainder, tag = _split_tag(remainder)
    registry, repository = _split_registry(remainder, original=text)
    if len(f"{registry}/{repository}") > MAX_NAME_LENGTH:
        raise InvalidRequest(f"image {text[:80]!r}: repository name longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)


def _split_digest(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    remainder, digest = text.split("@", 1)
    if not _DIGEST.fullmatch(digest):
        raise InvalidRequest(
            f"image {text!r}: digest must be sha256: followed by 64 lowercase hex characters"
        )
    return remainder, digest


def _split_tag(text: str) -> tuple[str, str | None]:
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon <= slash:
        return text, None
    tag = text[colon + 1 :]
    if not _TAG.fullmatch(tag):
        raise InvalidRequest(f"image {text!r}: invalid tag {tag!r}")
    return text[:colon], tag


def _split_registry(text: str, original: str) -> tuple[str, str]:
    first, sep, rest = text.partition("/")
    looks_like_domain = bool(sep) and ("." in first or ":" in first or first == "localhost" or first != first.lower())
    if looks_like_domain and "." not in first and ":" not in first and first.lower() != "localhost":
        # a host only by its capitals: lower-cased it would read as a Docker Hub path (no stable canonical form)
        raise InvalidRequest(
            f"image {original[:200]!r}: {first[:100]!r} names a registry only by its upper case; "
            "write the registry host in lower case with its domain or port"
        )
    if looks_like_domain:
        try:
            registry = canonical_host(first)
        except InvalidHost as exc:
            raise InvalidRequest(f"image {original[:200]!r}: invalid registry host: {exc}") from None
        path = rest
    else:
        registry, path = DOCKER_HUB, text
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"  # docker.io/nginx is docker.io/library/nginx, as Docker reads it
    components = path.split("/")
    bad = [c for c in components if not _PATH_COMPONENT.fullmatch(c)]
    if bad:
        raise InvalidRequest(
            f"image {original!r}: invalid repository path component {bad[0]!r} "
            "(lowercase letters, digits and single separators . _ __ - only)"
        )
    return registry, path
