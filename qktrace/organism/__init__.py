"""The model organism: a small Llama trained on the studies tasks (see data/organism)."""
