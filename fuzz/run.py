"""Coverage-guided fuzzing with atheris (libFuzzer): `python -m fuzz.run TARGET [libFuzzer args]`.

TARGET is `rpc` (every RPC's request path) or `config` (the TOML loader); see fuzz/targets.py.
The corpus directory (first positional libFuzzer argument, default fuzz/corpus/TARGET) is
seeded with valid inputs when empty. A finding stops the run, writes the input as
`crash-<sha1>` under -artifact_prefix, and exits non-zero; copy it to fuzz/regressions/TARGET/
so every test run replays it (tests/unit/test_fuzz.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["decider", "probe", "fuzz"]):
    from fuzz import targets


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{','.join(targets.TARGETS)}}} [libFuzzer args]")
    name = argv[1]
    args = [argv[0], *argv[2:]]
    if not any(not a.startswith("-") for a in args[1:]):
        args.append(str(Path(__file__).resolve().parent / "corpus" / name))
    corpus = next(a for a in args[1:] if not a.startswith("-"))
    words = Path(__file__).resolve().parent / f"{name}.dict"
    if words.is_file() and not any(a.startswith("-dict=") for a in args):
        args.insert(1, f"-dict={words}")
    targets.write_seeds(name, corpus)
    # Unexpected errors are findings, raised as Crash; the servicers' own error log is noise.
    logging.disable(logging.CRITICAL)
    target = targets.TARGETS[name]
    atheris.Setup(args, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
