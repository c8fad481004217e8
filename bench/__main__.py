"""``python -m bench [--quick] [--out bench-results/]``: measure the driver, print the targets, write JSON + PNGs.

Runs as root, in a private mount namespace entered before anything else (so no
bind mount reaches the host); the driver subprocess inherits it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of every scenario (about a minute)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"),
                        help="where results.json, results.md and the PNGs go (default: bench-results/)")  # fmt: skip
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="scratch directory for the registry and driver state (default: a new temp dir)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (driver log, state)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--driver", default=None, metavar="COMMAND",
                        help="how to launch the driver (default: python -m csi_wasm); 'serve ...' is appended")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="exit 1 if any target fails")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench: needs root (it bind-mounts, in a private mount namespace)", file=sys.stderr)
        return 2
    from csi_wasm.mounts import enter_private_mount_namespace

    enter_private_mount_namespace()  # first: before any thread exists (grpc, the registry's log reader)

    from bench.run import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
