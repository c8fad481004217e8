"""csi-wasm: a CSI node plugin that mounts WebAssembly modules from OCI registries into pods."""

__version__ = "0.1.0"
