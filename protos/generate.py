"""Regenerates the Python modules for our .proto files: `python -m protos.generate`.

`--check` regenerates into a temporary directory and exits 1 when a committed
file differs, so a stale checkout fails the test suite.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos/ep_recovery/v1")
PROTOS = ("common.proto", "worker.proto", "admin.proto")
GRPC_PROTOS = ("worker.proto", "admin.proto")


def _generated_names() -> list[str]:
    names: list[str] = []
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
        if proto in GRPC_PROTOS:
            names.append(f"{stem}_pb2_grpc.py")
    return names


def generate(out_root: Path) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
        ]
        if proto in GRPC_PROTOS:
            args.append(f"--grpc_python_out={out_root}")
        args.append(str(PROTO_DIR / proto))
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated files are stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in _generated_names()
            if not (ROOT / PROTO_DIR / name).exists()
            or not filecmp.cmp(Path(tmp) / PROTO_DIR / name, ROOT / PROTO_DIR / name, shallow=False)
        ]
    if stale:
        sys.stderr.write(
            "stale generated protobuf code: " + ", ".join(stale) + "; run `make protos`\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
