"""A self-contained demo: a local OCI registry, Wasm modules to push, and a kubelet-shaped client.

Used by ``csi-wasm demo`` (the README's first command) and by the test suite,
so the demo and the tests exercise the same real parts.
"""
