"""Generate the Python modules for every .proto file under protos/.

Run from the repository root (``make protos`` does): the modules land beside
the sources' import paths, rooted at the repository (``cloudstate/*_pb2.py``,
``examples/shoppingcart/*_pb2.py``), with ``.pyi`` stubs for type checking.
Generated files are never edited by hand and are not committed.
"""

from __future__ import annotations

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# Packages that hold only generated code get an empty __init__.py.
GENERATED_PACKAGES = ("cloudstate",)


def main() -> int:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *sources,
    ]
    # googleapis-common-protos ships google/api/*.proto inside site-packages.
    import google.api

    args.insert(2, f"-I{pathlib.Path(google.api.__path__[0]).parent.parent}")
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    for top in GENERATED_PACKAGES:
        for directory in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if directory.name != "__pycache__":
                (directory / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
