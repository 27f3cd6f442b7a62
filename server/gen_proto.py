"""Regenerate the Python code of the public API: `python -m server.gen_proto` (`make proto`).

The output depends only on the .proto files and the grpcio-tools version, which is therefore
pinned: another protoc would write different bytes and the staleness test would fail.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

REQUIRED_GRPCIO_TOOLS = "1.85.1"
PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("tandem/v1/tandem.proto",)


def generate(out_dir: Path) -> None:
    """Write tandem/v1/*_pb2.py, *_pb2_grpc.py and *_pb2.pyi under out_dir."""
    installed = version("grpcio-tools")
    if installed != REQUIRED_GRPCIO_TOOLS:
        raise RuntimeError(
            f"grpcio-tools=={REQUIRED_GRPCIO_TOOLS} is required for reproducible output, "
            f"found {installed}"
        )
    from grpc_tools import protoc

    well_known_protos = files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known_protos}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))


def main() -> None:
    generate(PROTO_ROOT)
    print(f"generated {', '.join(PROTO_FILES)} under {PROTO_ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
