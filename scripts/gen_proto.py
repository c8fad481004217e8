"""Regenerate the CSI gRPC stubs (and their mypy stubs) from proto/csi.proto.

    python scripts/gen_proto.py            # write into csi_wasm/_gen/
    python scripts/gen_proto.py --out DIR  # write elsewhere (the drift test does)

The proto is mapped onto the package path so the generated modules import each
other as ``csi_wasm._gen.csi_pb2`` rather than a bare top-level ``csi_pb2``.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_PATH = "csi_wasm/_gen"


def plugin(name: str) -> str:
    """A protoc plugin installed beside this interpreter (the venv's bin), else the one on PATH.

    protoc itself looks plugins up on PATH only, which may hold another version or none at all.
    """
    beside = pathlib.Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found beside {sys.executable} or on PATH: pip install -e '.[dev]'")
    return found


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"-I{PACKAGE_PATH}={ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"{PACKAGE_PATH}/csi.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes into <out>/csi_wasm/_gen/; flatten so <out> holds the modules.
    nested = out / PACKAGE_PATH
    for produced in nested.iterdir():
        produced.replace(out / produced.name)
    for parent in (nested, nested.parent):
        parent.rmdir()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / PACKAGE_PATH)
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    main(sys.argv[1:])
