"""Offline training: data, embeddings, the win-probability head, evaluation and export. Imports router, never the reverse."""
