"""qktrace: why does this attention head attend to that token?"""

__version__ = "0.1.0"
