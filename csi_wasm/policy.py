"""Which images pods on this node may use: the node configuration's ``allowed_images``.

Checked in ``VolumeSpec.parse``, before the driver touches the store or the
network, so a denied reference costs nothing and leaks nothing (not even whether
the image is already on the node).

A pattern is ``host[:port]/path`` matched against the reference's name (its
registry and repository; tag and digest do not matter):

* ``*`` matches any run of characters within one path component (never ``/``; in
  the host part never ``:`` either, so ``registry.example/*`` does not match
  ``registry.example:5000/x``);
* ``**`` matches any run of characters including ``/`` (a whole subtree);
* everything else matches itself. The pattern's host is canonicalized like a
  reference's (``reference.canonical_host``: lower case, no ``:443``, ``docker.io``
  for Docker Hub's aliases), so every spelling of a host matches the same patterns.

So ``registry.example/filters/*`` allows ``registry.example/filters/ratelimit`` but
not ``registry.example/filters/team/x`` (use ``registry.example/filters/**``), and
``docker.io/library/*`` covers ``docker.io/library/x`` (what ``x`` alone means).
An empty list allows every image.
"""

from __future__ import annotations

import re
from typing import Iterable

from csi_wasm.errors import AccessDenied
from csi_wasm.reference import DEFAULT_PORT, InvalidHost, Reference, canonical_host

MAX_PATTERN_LENGTH = 512
_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9._\-:/*\[\]]+\Z")


def validate_pattern(pattern: str) -> str | None:
    """What is wrong with an allow-list pattern, or None."""
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        return f"must be 1 to {MAX_PATTERN_LENGTH} characters"
    if not _PATTERN_CHARS.match(pattern):
        return "only letters, digits, '.', '_', '-', ':', '/', '[', ']' and the wildcards '*' and '**'"
    host, sep, path = pattern.partition("/")
    if not sep or not host or not path:
        return "expected HOST/PATH (for Docker Hub images write docker.io/library/NAME)"
    if "***" in pattern:
        return "'***' is not a wildcard; use '*' (one component) or '**' (any depth)"
    return None


def canonical_pattern_host(host: str) -> str:
    """A pattern's host in the form references use; wildcards are kept."""
    if "*" not in host:
        try:
            return canonical_host(host)
        except InvalidHost:
            return host.lower()  # matches no reference: references are valid hosts
    return host.lower().removesuffix(f":{DEFAULT_PORT}")


def _compile(pattern: str) -> re.Pattern[str]:
    host, _, path = pattern.partition("/")
    host = canonical_pattern_host(host)

    def translate(text: str, single: str) -> str:
        out = []
        for piece in re.split(r"(\*\*|\*)", text):
            if piece == "**":
                out.append(".*")
            elif piece == "*":
                out.append(single)
            else:
                out.append(re.escape(piece))
        return "".join(out)

    return re.compile(translate(host, "[^/:]*") + "/" + translate(path, "[^/]*"), re.DOTALL)


class ImagePolicy:
    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            problem = validate_pattern(pattern)
            if problem:
                raise ValueError(f"allowed_images pattern {pattern!r}: {problem}")
        self._compiled = tuple(_compile(p) for p in self.patterns)

    def allows(self, ref: Reference) -> bool:
        if not self._compiled:
            return True
        name = f"{ref.registry}/{ref.repository}"  # canonical: parse_reference made it so
        return any(regex.fullmatch(name) for regex in self._compiled)

    def check(self, ref: Reference) -> None:
        """Raise AccessDenied (PERMISSION_DENIED) for an image the node does not allow."""
        if not self.allows(ref):
            raise AccessDenied(
                f"image {ref} is not allowed on this node: it matches none of the node configuration's "
                f"allowed_images patterns; ask the cluster admin to allow it"
            )


__all__ = ["ImagePolicy", "validate_pattern"]
