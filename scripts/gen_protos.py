"""Generate the Python stubs of the dmp.v1 contract.

Usage: python scripts/gen_protos.py [OUT_DIR]

Writes dmp/v1/*_pb2.py, *_pb2_grpc.py and their .pyi stubs under OUT_DIR (the repository
root by default). The tests call it with a temporary OUT_DIR and compare the result with the
committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    """Run protoc with the grpc and mypy plugins; return the generated files."""
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "dmp" / "v1").glob("*.proto")
    )
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    target = out / "dmp" / "v1"
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*_pb2*"):
        old.unlink()
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = target / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated stubs of the dmp.v1 contract (make proto)."""\n')
    return sorted(target.glob("*_pb2*"))


if __name__ == "__main__":
    destination = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    files = generate(destination)
    print(f"generated {len(files)} files under {destination / 'dmp' / 'v1'}")
