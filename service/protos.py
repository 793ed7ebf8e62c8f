"""The gRPC stubs of proto/locca/v1/locca.proto: the ones an installed package ships (`locca_grpc`, generated when
the wheel is built, setup.py), or in a source checkout, generated with grpc_tools.protoc on first use.

In a checkout, output: `build/grpc/<sha256 of the .proto, 12 hex>/locca_pb2.py` and `locca_pb2_grpc.py` (build/ is
gitignored; never edit them). A changed .proto gets a new directory, so stale stubs are never loaded, and
processes generating at the same time cannot see half-written files (each writes a temporary directory and
renames it into place). The .proto is compiled from its own directory, so the modules are top-level
`locca_pb2` / `locca_pb2_grpc` and do not collide with this repository's `locca` package; the protobuf
package, and so every gRPC name, is still `locca.v1`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "locca" / "v1" / "locca.proto"
BUILD = ROOT / "build" / "grpc"
SERVICE = "locca.v1.LocCa"


def generate(proto: Path = PROTO, build: Path = BUILD) -> Path:
    """Generate the stubs unless they exist; returns their directory."""
    digest = hashlib.sha256(proto.read_bytes()).hexdigest()[:12]
    out = build / digest
    if (out / "locca_pb2_grpc.py").is_file():
        return out
    from grpc_tools import protoc  # noqa: PLC0415 (only needed once)

    build.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=build, prefix=".tmp-"))
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto.parent}", f"-I{include}", f"--python_out={tmp}",
                      f"--grpc_python_out={tmp}", str(proto)])
    if rc != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"protoc failed ({rc}) on {proto}")
    tmp.chmod(0o755)  # mkdtemp makes it 0700: stubs generated at image build must be readable by the server's user
    try:
        os.rename(tmp, out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load() -> tuple[ModuleType, ModuleType]:
    """-> (locca_pb2, locca_pb2_grpc): the installed package's, else generated from the checkout's .proto. In
    a checkout whose .proto changed since its editable install made `locca_grpc`, the checkout's wins."""
    try:
        import locca_grpc  # noqa: PLC0415 (shipped in the wheel)

        shipped = Path(locca_grpc.__file__).parent / "locca.proto"
        if not PROTO.is_file() or (shipped.is_file() and shipped.read_bytes() == PROTO.read_bytes()):
            from locca_grpc import locca_pb2, locca_pb2_grpc  # noqa: PLC0415

            return locca_pb2, locca_pb2_grpc
    except ImportError:
        pass  # a source checkout: the stubs are made from proto/ (grpcio-tools, the dev extra)
    out = str(generate())
    if out not in sys.path:
        sys.path.insert(0, out)
    return importlib.import_module("locca_pb2"), importlib.import_module("locca_pb2_grpc")
