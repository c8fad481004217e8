"""The csi-wasm benchmark: ``python -m bench`` from the repository root (needs root).

Not a test: it measures the real driver (a subprocess serving its unix socket)
against a real local registry, prints every target with PASS/FAIL, and writes
the raw figures as JSON (and the plots as PNG) under ``--out``.
See docs/performance.md for the method.
"""
