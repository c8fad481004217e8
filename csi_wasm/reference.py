"""Parse and validate OCI image references (the grammar of distribution/reference).

A pod author writes the reference, so it is untrusted input: anything that is
not a well-formed reference is refused before the driver touches the network.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from csi_wasm.errors import InvalidRequest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
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


@dataclass(frozen=True)
class Reference:
    """A validated reference. ``digest`` pins content; ``tag`` is a mutable name."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host:port to send registry API requests to."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

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


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _split_registry(text: str, original: str) -> tuple[str, str]:
    first, sep, rest = text.partition("/")
    looks_like_domain = bool(sep) and ("." in first or ":" in first or first == "localhost" or first != first.lower())
    if looks_like_domain:
        domain = _DOMAIN.fullmatch(first)
        if (
            not domain
            or (domain.group(1) is not None and not 0 < int(domain.group(1)) <= 65535)
            or (first.startswith("[") and not _is_ipv6(first[1 : first.index("]")]))
        ):
            raise InvalidRequest(f"image {original!r}: invalid registry host {first!r}")
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, text
        if "/" not in path:
            path = f"library/{path}"
    components = path.split("/")
    bad = [c for c in components if not _PATH_COMPONENT.fullmatch(c)]
    if bad:
        raise InvalidRequest(
            f"image {original!r}: invalid repository path component {bad[0]!r} "
            "(lowercase letters, digits and single separators . _ __ - only)"
        )
    return registry, path
