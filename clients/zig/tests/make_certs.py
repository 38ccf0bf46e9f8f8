"""Writes test certificates for the Zig TLS tests into a directory, with the
repository's own test CA (tests/tls_certs.py): ca.crt, server.crt/.key (for
decider.test, localhost and 127.0.0.1) and client.crt/.key."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.tls_certs import CA  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    ca = CA(out)
    shutil.copyfile(ca.ca_file, out / "ca.crt")
    ca.server_pair(stem="server")
    ca.issue("zig-client", server=False, stem="client")


if __name__ == "__main__":
    main()
