"""Prompts to batches: positions, padding, the batch loop every verb runs."""
