"""Embeddings and the transformer layer shared by every model, text-only included."""
