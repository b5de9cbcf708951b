"""Generate the Python gRPC code for protos/ into the package ``eraser_proto``.

    python protos/generate.py [OUT_ROOT]     (default: the repository root)

The generated package is kept apart from hand-written code and committed; the test
suite regenerates it into a temporary directory and fails if the committed copy differs.
The proto files are mapped under ``eraser_proto/`` on the include path so the generated
imports (``from eraser_proto.eraser.v1 import eraser_pb2``) do not collide with the
engine package ``eraser``.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PACKAGE = "eraser_proto"
ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE}={PROTOS}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[f"{PACKAGE}/{s.as_posix()}" for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out_root / PACKAGE
    # Regular packages (not namespace packages) so setuptools ships them.
    for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/ by protos/generate.py; do not edit."""\n' if d == pkg else "")
    return sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path.relative_to(out))
