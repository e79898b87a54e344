"""Entry point: `python -m bench [--quick] [--out bench-results/latency.json]`."""

from bench.latency import main

raise SystemExit(main())
