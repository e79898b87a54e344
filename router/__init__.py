"""Tier router: picks the cheapest LLM tier whose predicted quality clears a deployment's floor."""

__version__ = "0.1.0"
