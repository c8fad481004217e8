"""A streaming tar reader with bounded memory, for compat layers (a tar+gzip holding ``plugin.wasm``).

``tarfile`` reads a pax extended header or a GNU long name whole, whatever size it
declares: a 400 MB pax header inside a few hundred KB of gzip took the driver past
its memory limit. Here every header block is 512 bytes, pax headers and GNU long
names/links are refused above ``MAX_METADATA_BYTES``, entry data is streamed or
skipped in chunks, and nothing else is kept. Only what a compat layer needs is read:
entry names (ustar prefix, pax ``path``, GNU long names), types, sizes (pax ``size``
too) and the data of the one entry the caller asks for.

The reader follows ``tarfile``'s rules where they matter for picking the entry
(tests compare the two on archives ``tarfile`` writes in every format): a typeless
(``\\0``) entry named with a trailing ``/`` is a directory; links, directories,
devices and fifos carry no data whatever their size field says; global pax headers
apply to every later entry; the archive ends at the first all-zero block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from csi_wasm.errors import TooLarge, UnsupportedLayout

BLOCK = 512
CHUNK = 256 * 1024
MAX_METADATA_BYTES = 64 * 1024  # a path is at most 4 KiB on Linux; a pax header holds a few of them

_REGULAR = {b"0": "file", b"\0": "file", b"7": "file"}
_NO_DATA = {b"1": "hardlink", b"2": "symlink", b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo"}
_PAX, _PAX_GLOBAL, _SOLARIS_PAX = b"x", b"g", b"X"
_LONG_NAME, _LONG_LINK, _SPARSE = b"L", b"K", b"S"
_POSIX_MAGIC = b"ustar\x0000"


@dataclass(frozen=True)
class Member:
    name: str
    kind: str  # file, dir, symlink, hardlink, char, block, fifo, sparse, other
    size: int  # bytes of data that follow the header (0 for entries without data)


class TarStream:
    """Iterate the members of a tar read through ``read`` (``read(n)`` returns at most n bytes, b"" at the end).

    ``data(member)`` streams the member just yielded; data not read is skipped when
    the iteration goes on.
    """

    def __init__(self, read: Callable[[int], bytes], image: str) -> None:
        self._read = read
        self._image = image
        self._pending = 0  # data bytes (with padding) of the current member not read yet
        self._global: dict[str, str] = {}

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._skip(self._pending)
            self._pending = 0
            member = self._next_member()
            if member is None:
                return
            self._pending = _padded(member.size)
            yield member

    def data(self, member: Member) -> Iterator[bytes]:
        left = member.size
        while left:
            chunk = self._exact(min(CHUNK, left), "entry data")
            left -= len(chunk)
            self._pending -= len(chunk)
            yield chunk

    # -- headers ---------------------------------------------------------------------------------

    def _next_member(self) -> Member | None:
        """The next real entry, after any pax headers and GNU long names that describe it."""
        overrides: dict[str, str] = dict(self._global)
        while True:
            block = self._read_exact_or_end(BLOCK, "a header")
            if block is None or block.count(0) == BLOCK:
                return None  # the end-of-archive marker, or the data simply ends (as tarfile reads it)
            _check_checksum(block, self._image)
            kind, size = block[156:157], self._number(block[124:136])
            if kind in (_PAX, _SOLARIS_PAX, _PAX_GLOBAL):
                records = _pax_records(self._metadata(size, "pax header"), self._image)
                if kind == _PAX_GLOBAL:
                    self._global.update(records)
                overrides.update(records)
                continue
            if kind == _LONG_NAME:
                overrides["path"] = _text(self._metadata(size, "GNU long name").split(b"\0", 1)[0])
                continue
            if kind == _LONG_LINK:
                self._metadata(size, "GNU long link name")  # read past it; links are never followed here
                continue
            return self._member(block, kind, size, overrides)

    def _member(self, block: bytes, kind: bytes, size: int, overrides: dict[str, str]) -> Member:
        name = _text(block[0:100].split(b"\0", 1)[0])
        if block[257:265] == _POSIX_MAGIC and kind != _SPARSE:
            prefix = _text(block[345:500].split(b"\0", 1)[0])
            name = f"{prefix}/{name}" if prefix else name
        name = overrides.get("path", name)
        if "size" in overrides:
            size = self._decimal(overrides["size"])
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"
        if kind in _NO_DATA:
            return Member(name.rstrip("/") if kind == b"5" else name, _NO_DATA[kind], 0)
        if kind == _SPARSE:
            self._skip_sparse_extensions(block)
            return Member(name, "sparse", size)
        if any(key.startswith("GNU.sparse.") for key in overrides):
            return Member(name, "sparse", size)
        return Member(name, _REGULAR.get(kind, "other"), size)

    def _skip_sparse_extensions(self, block: bytes) -> None:
        extended = block[482]
        while extended:  # old GNU sparse: more 512-byte maps follow the header, each saying if another does
            extended = self._exact(BLOCK, "sparse map")[504]

    def _metadata(self, size: int, what: str) -> bytes:
        if size > MAX_METADATA_BYTES:
            raise TooLarge(
                f"image {self._image}: a {what} in the compat layer is {size} bytes, over the "
                f"{MAX_METADATA_BYTES} this node reads"
            )
        data = self._exact(size, what)
        self._skip(_padded(size) - size)
        return data

    # -- numbers -----------------------------------------------------------------------------------

    def _number(self, field: bytes) -> int:
        if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
            value = int.from_bytes(field[1:], "big")
            if field[0] == 0xFF:
                value -= 256 ** (len(field) - 1)
        else:
            text = field.split(b"\0", 1)[0].strip()
            try:
                value = int(text or b"0", 8)
            except ValueError:
                raise self._invalid("a header has an unreadable number") from None
        if value < 0:
            raise self._invalid("a header has a negative size")
        return value

    def _decimal(self, text: str) -> int:
        if not text.isdigit():
            raise self._invalid("a pax size is not a number")
        return int(text)

    # -- reading -----------------------------------------------------------------------------------

    def _skip(self, count: int) -> None:
        while count > 0:
            count -= len(self._exact(min(CHUNK, count), "entry data"))

    def _exact(self, count: int, what: str) -> bytes:
        data = self._read_exact_or_end(count, what)
        if data is None:
            raise self._invalid(f"the archive is truncated inside {what}")
        return data

    def _read_exact_or_end(self, count: int, what: str) -> bytes | None:
        """``count`` bytes; None at a clean end (nothing read); invalid if the end comes part-way."""
        parts, got = [], 0
        while got < count:
            chunk = self._read(count - got)
            if not chunk:
                if got == 0:
                    return None
                raise self._invalid(f"the archive is truncated inside {what}")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _invalid(self, why: str) -> UnsupportedLayout:
        return UnsupportedLayout(f"image {self._image}: the compat layer is not a valid tar+gzip: {why}")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _check_checksum(block: bytes, image: str) -> None:
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field or b"0", 8)
    except ValueError:
        stored = -1
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 0x20
    if stored not in (unsigned, signed):
        raise UnsupportedLayout(f"image {image}: the compat layer is not a valid tar+gzip: a header checksum is wrong")


def _pax_records(data: bytes, image: str) -> dict[str, str]:
    """``<length> <key>=<value>\\n`` records; only the keys that say which entry this is are kept."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        length = data[position:space]
        if space < 0 or not length.isdigit() or not space - position + 3 <= int(length) <= len(data) - position:
            raise _malformed_pax(image)
        record = data[space + 1 : position + int(length)]
        position += int(length)
        key, equals, value = record.rstrip(b"\n").partition(b"=")
        if not equals or not record.endswith(b"\n"):
            raise _malformed_pax(image)
        name = _text(key)
        if name in ("path", "size") or name.startswith("GNU.sparse."):
            records[name] = _text(value)
    return records


def _malformed_pax(image: str) -> UnsupportedLayout:
    return UnsupportedLayout(f"image {image}: the compat layer is not a valid tar+gzip: a pax record is malformed")
