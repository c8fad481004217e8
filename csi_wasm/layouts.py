"""Find the Wasm module in an OCI manifest, whichever tool pushed it.

Selection is by media type, exactly, in this order; anything ambiguous is refused
rather than guessed, with a message that says what was found.

| layout                | how the module is found                                              |
| --------------------- | -------------------------------------------------------------------- |
| CNCF Wasm artifact    | config ``application/vnd.wasm.config.v0+json``, one ``application/wasm`` layer |
| Istio/solo "oci"      | one ``application/vnd.module.wasm.content.layer.v1+wasm`` layer      |
| wasm-to-oci (legacy)  | one ``application/vnd.wasm.content.layer.v1+wasm`` layer             |
| compat image          | last ``...tar+gzip`` / ``...rootfs.diff.tar.gzip`` layer holding ``plugin.wasm`` |
| index / manifest list | the manifest for platform wasm (os wasip1/wasip2 or arch wasm), or the only one |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from csi_wasm.errors import UnsupportedLayout
from csi_wasm.reference import is_sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPTED_MANIFEST_TYPES = MANIFEST_TYPES + INDEX_TYPES

WASM_CONFIG_V0 = "application/vnd.wasm.config.v0+json"
RAW_LAYER_TYPES = {
    "application/wasm": "cncf-wasm-artifact",
    "application/vnd.module.wasm.content.layer.v1+wasm": "istio-oci",
    "application/vnd.wasm.content.layer.v1+wasm": "wasm-to-oci",
}
TAR_GZIP_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar+gzip": "compat-oci",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "compat-docker",
}
WASM_PLATFORM_OS = ("wasip1", "wasip2", "wasi")


@dataclass(frozen=True)
class ModuleLayer:
    """Where the module is: a raw blob, or ``plugin.wasm`` inside a gzip'd tar blob."""

    digest: str
    size: int
    media_type: str
    layout: str
    packaging: Literal["raw", "tar+gzip"]


def is_index(media_type: str, manifest: dict[str, Any]) -> bool:
    return media_type in INDEX_TYPES or (not media_type and "manifests" in manifest)


def select_from_index(image: str, manifest: dict[str, Any]) -> str:
    """Return the digest of the manifest to use from an index or manifest list."""
    entries = _dicts(manifest.get("manifests"))
    if not entries:
        raise UnsupportedLayout(f"image {image}: the image index lists no manifests")
    wasm = [m for m in entries if _is_wasm_platform(m.get("platform"))]
    chosen = wasm if wasm else entries
    if len(chosen) != 1:
        raise UnsupportedLayout(
            f"image {image}: the image index has {len(entries)} manifests and "
            f"{len(wasm)} for platform wasm; expected exactly one wasm platform or a single manifest"
        )
    return _digest(image, chosen[0])


def select_module_layer(image: str, media_type: str, manifest: dict[str, Any]) -> ModuleLayer:
    """Pick the module's layer from an image manifest; raise UnsupportedLayout if unsure."""
    if media_type and media_type not in MANIFEST_TYPES:
        raise UnsupportedLayout(f"image {image}: unsupported manifest media type {media_type!r}")
    layers = _dicts(manifest.get("layers"))
    if not layers:
        raise UnsupportedLayout(f"image {image}: the manifest has no layers")
    raw = [layer for layer in layers if _text(layer.get("mediaType")) in RAW_LAYER_TYPES]
    if len(raw) > 1:
        raise UnsupportedLayout(
            f"image {image}: {len(raw)} Wasm layers found; expected exactly one module per image"
        )
    if raw:
        return _layer(image, raw[0], "raw", RAW_LAYER_TYPES[raw[0]["mediaType"]])
    last = layers[-1]
    if _text(last.get("mediaType")) in TAR_GZIP_LAYER_TYPES:
        return _layer(image, last, "tar+gzip", TAR_GZIP_LAYER_TYPES[last["mediaType"]])
    found = sorted({str(layer.get("mediaType")) for layer in layers})
    raise UnsupportedLayout(
        f"image {image}: no Wasm module layer found (layer media types: {', '.join(found)}); "
        "push it as a Wasm OCI artifact (application/wasm) or a compat image with plugin.wasm"
    )


def _layer(image: str, entry: dict[str, Any], packaging: Literal["raw", "tar+gzip"], layout: str) -> ModuleLayer:
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UnsupportedLayout(f"image {image}: layer descriptor has no valid size")
    return ModuleLayer(
        digest=_digest(image, entry), size=size, media_type=entry["mediaType"], layout=layout, packaging=packaging
    )


def _digest(image: str, descriptor: dict[str, Any]) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not is_sha256_digest(digest):
        raise UnsupportedLayout(f"image {image}: descriptor digest {digest!r} is not a sha256 digest")
    return digest


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects of a JSON list; nothing if the registry sent something else (a hostile manifest may)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _is_wasm_platform(platform: Any) -> bool:
    if not isinstance(platform, dict):
        return False
    return platform.get("architecture") == "wasm" or platform.get("os") in WASM_PLATFORM_OS
