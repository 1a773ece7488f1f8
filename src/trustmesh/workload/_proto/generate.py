"""Regenerate workload_pb2.py, workload_pb2.pyi and workload_pb2_grpc.py from workload.proto.

Run from the repository root with the dev dependencies installed (grpcio-tools):
``.venv/bin/python src/trustmesh/workload/_proto/generate.py``. The generated modules are
committed, so installing trustmesh needs no code generator.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
# The generated gRPC module imports "workload_pb2" as a top-level module; make it relative.
_ABSOLUTE = "import workload_pb2 as workload__pb2"
_RELATIVE = "from . import workload_pb2 as workload__pb2"


def main() -> int:
    """Run protoc, then make the generated gRPC module import its sibling relatively."""
    include = str(resources.files("grpc_tools") / "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={HERE}",
            f"--pyi_out={HERE}",
            f"--grpc_python_out={HERE}",
            str(HERE / "workload.proto"),
        ]
    )
    if code != 0:
        return int(code)
    grpc_module = HERE / "workload_pb2_grpc.py"
    text = grpc_module.read_text()
    if _ABSOLUTE not in text:
        print(f"unexpected generated code in {grpc_module}", file=sys.stderr)
        return 1
    grpc_module.write_text(text.replace(_ABSOLUTE, _RELATIVE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
