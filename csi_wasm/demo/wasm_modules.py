"""Build small, valid WebAssembly binaries of a chosen size (a custom section pads them)."""

from __future__ import annotations

import hashlib

from csi_wasm.wasm import CORE_MODULE_VERSION, MAGIC

COMPONENT_VERSION = b"\x0d\x00\x01\x00"


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _leb128_padded(value: int) -> bytes:
    """5-byte LEB128 (valid for u32 in Wasm): the section size never changes the byte count."""
    return bytes([(value >> (7 * i) & 0x7F) | (0x80 if i < 4 else 0) for i in range(5)])


def make_module(size: int = 1024, seed: str = "demo", component: bool = False) -> bytes:
    """A module of exactly ``size`` bytes (at least 48) whose content depends on ``seed``."""
    header = MAGIC + (COMPONENT_VERSION if component else CORE_MODULE_VERSION)
    name = b"csi-wasm." + hashlib.sha256(seed.encode()).hexdigest()[:16].encode()
    prefix = _leb128(len(name)) + name
    payload_len = size - len(header) - 1 - 5 - len(prefix)
    if payload_len < 0:
        raise ValueError(f"a module needs at least {size - payload_len} bytes")
    body = prefix + b"\0" * payload_len
    return header + b"\x00" + _leb128_padded(len(body)) + body


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
