"""Offline training: data, embeddings, the head, evaluation, export. Imports router, never the reverse."""
