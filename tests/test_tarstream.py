"""Our streaming tar reader (csi_wasm/tarstream.py) against the standard library's on every format it writes,
and against the archives tarfile cannot read within bounded memory."""

from __future__ import annotations

import io
import tarfile
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_wasm.errors import TooLarge, UnsupportedLayout
from csi_wasm.tarstream import MAX_METADATA_BYTES, TarStream

KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file", tarfile.DIRTYPE: "dir",
         tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
         tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}  # fmt: skip
WRITE_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
               "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}  # fmt: skip
FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


def _reader(data: bytes, chunk: int = 1000) -> TarStream:
    stream = io.BytesIO(data)
    return TarStream(lambda n: stream.read(min(n, chunk)), "registry.example/t:v1")


def _ours(data: bytes) -> list[tuple[str, str, int, bytes]]:
    archive = _reader(data)
    return [(m.name, m.kind, m.size, b"".join(archive.data(m)) if m.kind == "file" else b"") for m in archive]


def _theirs(data: bytes) -> list[tuple[str, str, int, bytes]]:
    found = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        for member in archive:
            kind = KINDS.get(member.type, "other")
            body = archive.extractfile(member).read() if member.isreg() else b""  # type: ignore[union-attr]
            found.append((member.name, kind, member.size if kind == "file" else 0, body))
    return found


names = st.one_of(
    st.sampled_from(["plugin.wasm", "a/plugin.wasm", "./plugin.wasm", "dir/", "x" * 99, "y" * 100, "z" * 101,
                     "d/" * 60 + "plugin.wasm", "p" * 300, "é/plugin.wasm", "a b/c", "tail/"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="/\\"), min_size=1, max_size=40),
)  # fmt: skip
members = st.lists(st.tuples(names, st.sampled_from(sorted(WRITE_TYPES)), st.binary(max_size=3000)), max_size=5)


def _write(entries: list[tuple[str, str, bytes]], tar_format: int) -> bytes | None:
    raw = io.BytesIO()
    try:
        with tarfile.open(fileobj=raw, mode="w", format=tar_format, encoding="utf-8") as archive:
            for name, kind, data in entries:
                info = tarfile.TarInfo(name)
                info.type = WRITE_TYPES[kind]
                if kind in ("symlink", "hardlink"):
                    info.linkname = "target/" + name
                if kind == "char":
                    info.devmajor, info.devminor = 1, 3
                info.size = len(data) if kind == "file" else 0
                archive.addfile(info, io.BytesIO(data) if kind == "file" else None)
    except ValueError:
        return None  # a name this format cannot hold (ustar: over 255 bytes, or no place to split it)
    return raw.getvalue()


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(members, st.sampled_from(FORMATS))
def test_it_reads_what_tarfile_reads(entries: list[tuple[str, str, bytes]], tar_format: int) -> None:
    data = _write(entries, tar_format)
    if data is None:
        return
    assert _ours(data) == _theirs(data)


def test_skipping_data_it_was_not_asked_for() -> None:
    data = _write([("a", "file", b"1" * 5000), ("b", "file", b"2" * 10), ("c", "file", b"3")], tarfile.GNU_FORMAT)
    assert data is not None
    archive = _reader(data)
    seen = []
    for member in archive:
        if member.name == "b":
            seen.append(b"".join(archive.data(member)))
    assert seen == [b"2" * 10]


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT)


def _endless_after(prefix: bytes) -> Iterator[bytes]:
    yield prefix
    while True:
        yield b"z" * 65536


@pytest.mark.parametrize("kind, what", [(tarfile.XHDTYPE, "pax header"), (tarfile.XGLTYPE, "pax header"),
                                        (tarfile.GNUTYPE_LONGNAME, "GNU long name"),
                                        (tarfile.GNUTYPE_LONGLINK, "GNU long link name")])  # fmt: skip
def test_a_huge_metadata_entry_is_refused_before_it_is_read(kind: bytes, what: str) -> None:
    chunks = _endless_after(_header("././@meta", kind, 400_000_000))
    pulled = [0]

    def read(count: int) -> bytes:
        pulled[0] += 1
        return next(chunks)[:count]

    with pytest.raises(TooLarge, match=what):
        list(TarStream(read, "registry.example/t:v1"))
    assert pulled[0] == 1  # the header block, nothing of the 400 MB


def test_metadata_at_the_limit_is_read() -> None:
    long_name = "d/" * (MAX_METADATA_BYTES // 2 - 20) + "plugin.wasm"
    data = _write([(long_name, "file", b"\0asm\x01\0\0\0")], tarfile.GNU_FORMAT)
    assert data is not None and _ours(data) == _theirs(data)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:700], "truncated inside entry data"),
    (lambda d: d[:300], "truncated inside a header"),
    (lambda d: d[:100] + b"X" + d[101:], "checksum"),
    (lambda d: d[:124] + b"9" * 12 + d[136:], "checksum"),
])  # fmt: skip
def test_a_damaged_archive_is_refused(damage: object, message: str) -> None:
    data = _write([("plugin.wasm", "file", b"w" * 1000)], tarfile.GNU_FORMAT)
    assert data is not None
    with pytest.raises(UnsupportedLayout, match=message):
        _ours(damage(data))  # type: ignore[operator]


def _pax_with(damage: object) -> bytes:
    data = _write([("p" * 300, "file", b"x")], tarfile.PAX_FORMAT)  # the long name goes in a pax header
    assert data is not None
    return damage(data)  # type: ignore[operator,no-any-return]


@pytest.mark.parametrize("damage", [
    lambda d: d[:512] + b"9" * (d.index(b" path=") - 512) + d[d.index(b" path="):],  # a length past the header
    lambda d: d[:512] + b"1" + d[513:],  # a length too short to hold its own key
    lambda d: d.replace(b" path=", b" path:", 1),  # no '='
])  # fmt: skip
def test_a_malformed_pax_record_is_refused(damage: object) -> None:
    data = _pax_with(damage)
    header = bytearray(data[:512])  # keep the pax header's own checksum right: only its records are damaged
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()
    with pytest.raises(UnsupportedLayout, match="pax record is malformed"):
        _ours(bytes(header) + data[512:])


def test_an_old_gnu_sparse_entry_is_skipped_with_its_extension_blocks() -> None:
    header = bytearray(_header("sparse", tarfile.GNUTYPE_SPARSE, 512))
    header[482] = 1  # one extension block follows
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()
    extension = bytearray(512)  # says no more follow
    data = bytes(header) + bytes(extension) + b"s" * 512 + (_write([("plugin.wasm", "file", b"m")], tarfile.GNU_FORMAT) or b"")
    assert [(m.name, m.kind) for m in _reader(data)] == [("sparse", "sparse"), ("plugin.wasm", "file")]
