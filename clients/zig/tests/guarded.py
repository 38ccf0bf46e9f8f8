"""Runs a command that dies with the test process that started it.

`python guarded.py PROGRAM ARGS...` asks Linux (prctl PR_SET_PDEATHSIG) to send
SIGTERM when the parent dies, then execs the program in its own place, so the
pid the test holds is the program's. A test that crashes mid-way then leaves
no Decider or backend behind on the machine.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:  # the parent already died before prctl took effect
        sys.exit(1)
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
