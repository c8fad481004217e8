"""Recognise a WebAssembly binary by its preamble."""

from __future__ import annotations

MAGIC = b"\x00asm"
CORE_MODULE_VERSION = b"\x01\x00\x00\x00"
HEADER_LENGTH = 8


def header_kind(header: bytes) -> str | None:
    """``"module"`` for a core module, ``"component"`` for a component-model binary, else None.

    A component keeps the magic and changes the 4-byte version/layer field: the
    layer half-word (bytes 6-7) is 1 for components (``0d 00 01 00`` in current
    drafts); the version half-word moves with the draft, so it is not pinned here.
    """
    if len(header) < HEADER_LENGTH or header[:4] != MAGIC:
        return None
    if header[4:8] == CORE_MODULE_VERSION:
        return "module"
    if header[6:8] == b"\x01\x00":
        return "component"
    return None
