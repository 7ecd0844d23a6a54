"""Build hook: generate the gRPC stubs of sidestep's own services from protos/ (see protos/README.md).

Everything else about the package is in pyproject.toml. Runs for wheels and for `pip install -e .`.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTOS = ROOT / "protos"


def generate_stubs() -> None:
    """protos/<package path>/x.proto → <package path>/x_pb2.py, x_pb2.pyi, x_pb2_grpc.py."""
    from grpc_tools import protoc  # a build requirement (pyproject [build-system])

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    for proto in sorted(PROTOS.rglob("*.proto")):
        args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
