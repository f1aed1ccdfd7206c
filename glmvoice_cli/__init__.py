"""glmvoice: a local, streaming voice assistant around GLM-4-Voice.

Importing this package is cheap: torch, transformers and sounddevice are only imported by the
modules that need them.
"""

__version__ = "0.1.0"
