"""Build-time step of the package (the rest is pyproject.toml): generate the gRPC stubs from the .proto and put
them, with the .proto, into the `locca_grpc` package of the wheel (of an editable install: of the source tree,
where git ignores them), so an installed server or client never runs protoc and the contract travels with the
code."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO = Path(__file__).resolve().parent / "proto" / "locca" / "v1" / "locca.proto"


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

        # an editable install (pip install -e .) imports the package from the source tree: the stubs go there
        out = (PROTO.parents[3] if getattr(self, "editable_mode", False) else Path(self.build_lib)) / "locca_grpc"
        out.mkdir(parents=True, exist_ok=True)
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={out}",
                          f"--grpc_python_out={out}", str(PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
        grpc_module = out / "locca_pb2_grpc.py"  # protoc writes a top-level import; inside a package, relative
        grpc_module.write_text(grpc_module.read_text().replace("import locca_pb2 as", "from . import locca_pb2 as"))
        shutil.copy(PROTO, out / "locca.proto")


setup(cmdclass={"build_py": BuildWithStubs})
