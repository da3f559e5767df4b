"""Data shipped with qktrace (importable as `qktrace.data`): item lists and the model organism."""
