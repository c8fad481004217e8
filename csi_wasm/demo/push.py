"""Push Wasm modules to a registry in each layout users push them in (demo and tests)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

import requests

from csi_wasm import layouts
from csi_wasm.demo.wasm_modules import sha256_digest

EMPTY_CONFIG = b"{}"


@dataclass(frozen=True)
class Pushed:
    reference: str  # host/repo:tag
    manifest_digest: str
    module_digest: str
    layer_digest: str

    @property
    def pinned(self) -> str:
        """host/repo@sha256:... (the manifest digest)."""
        return f"{self.reference.rsplit(':', 1)[0]}@{self.manifest_digest}"


class Pusher:
    def __init__(self, host: str, scheme: str = "http", auth: tuple[str, str] | None = None, verify: bool | str = True):
        self.host = host
        self.base = f"{scheme}://{host}/v2"
        self.session = requests.Session()
        self.session.verify = verify
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override ``verify``
        if auth:
            self.session.auth = auth

    def blob(self, repo: str, data: bytes) -> dict[str, Any]:
        digest = sha256_digest(data)
        start = self.session.post(f"{self.base}/{repo}/blobs/uploads/", timeout=30)
        start.raise_for_status()
        location = start.headers["Location"]
        if location.startswith("/"):
            location = f"{self.base.rsplit('/v2', 1)[0]}{location}"
        separator = "&" if "?" in location else "?"
        done = self.session.put(
            f"{location}{separator}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )
        done.raise_for_status()
        return {"digest": digest, "size": len(data)}

    def manifest(self, repo: str, tag: str, manifest: dict[str, Any], media_type: str) -> str:
        body = json.dumps(manifest).encode()
        response = self.session.put(
            f"{self.base}/{repo}/manifests/{tag}", data=body, headers={"Content-Type": media_type}, timeout=30
        )
        response.raise_for_status()
        return sha256_digest(body)

    # -- layouts -----------------------------------------------------------

    def wasm_artifact(self, repo: str, tag: str, module: bytes, layer_type: str = "application/wasm") -> Pushed:
        """CNCF Wasm artifact (default), or the Istio / wasm-to-oci variants by ``layer_type``."""
        layer = self.blob(repo, module) | {"mediaType": layer_type}
        if layer_type == "application/wasm":
            config_body = json.dumps(
                {"architecture": "wasm", "os": "wasip1", "layerDigests": [layer["digest"]]}
            ).encode()
            config_type = layouts.WASM_CONFIG_V0
        elif layer_type == "application/vnd.wasm.content.layer.v1+wasm":
            config_body, config_type = EMPTY_CONFIG, "application/vnd.wasm.config.v1+json"
        else:
            config_body, config_type = EMPTY_CONFIG, "application/vnd.oci.empty.v1+json"
        config = self.blob(repo, config_body) | {"mediaType": config_type}
        layers = [layer]
        if layer_type == "application/vnd.module.wasm.content.layer.v1+wasm":
            # Istio's own tests push a config layer beside the module
            layers.append(self.blob(repo, b'{"abiVersion":"v0-4d8e"}') | {"mediaType": "application/vnd.module.wasm.config.v1+json"})
        manifest = {"schemaVersion": 2, "mediaType": layouts.OCI_MANIFEST, "config": config, "layers": layers}
        digest = self.manifest(repo, tag, manifest, layouts.OCI_MANIFEST)
        return Pushed(f"{self.host}/{repo}:{tag}", digest, sha256_digest(module), layer["digest"])

    def compat_image(self, repo: str, tag: str, module: bytes, docker: bool = False, path: str = "plugin.wasm") -> Pushed:
        """A container image whose last layer is a tar+gzip holding ``plugin.wasm``."""
        layer_bytes = tar_gzip({path: module})
        media_type = layouts.DOCKER_MANIFEST if docker else layouts.OCI_MANIFEST
        layer_type = (
            "application/vnd.docker.image.rootfs.diff.tar.gzip" if docker else "application/vnd.oci.image.layer.v1.tar+gzip"
        )
        config_type = "application/vnd.docker.container.image.v1+json" if docker else "application/vnd.oci.image.config.v1+json"
        config = self.blob(repo, json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode())
        layer = self.blob(repo, layer_bytes) | {"mediaType": layer_type}
        manifest = {"schemaVersion": 2, "mediaType": media_type, "config": config | {"mediaType": config_type}, "layers": [layer]}
        digest = self.manifest(repo, tag, manifest, media_type)
        return Pushed(f"{self.host}/{repo}:{tag}", digest, sha256_digest(module), layer["digest"])

    def index(self, repo: str, tag: str, entries: list[tuple[Pushed, dict[str, str]]]) -> str:
        manifests = []
        for pushed, platform in entries:
            body = self.session.get(
                f"{self.base}/{repo}/manifests/{pushed.manifest_digest}",
                headers={"Accept": layouts.OCI_MANIFEST}, timeout=30,
            )  # fmt: skip
            body.raise_for_status()
            manifests.append({"mediaType": layouts.OCI_MANIFEST, "digest": pushed.manifest_digest,
                              "size": len(body.content), "platform": platform})  # fmt: skip
        return self.manifest(
            repo, tag, {"schemaVersion": 2, "mediaType": layouts.OCI_INDEX, "manifests": manifests}, layouts.OCI_INDEX
        )


def tar_gzip(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)
