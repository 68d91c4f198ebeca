"""vmiso: run Python programs you cannot audit in disposable, offline virtual machines."""

__version__ = "0.1.0"
