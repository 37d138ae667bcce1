"""safereact-interp: diagnose, repair and causally verify safety mechanisms masked by post-training."""

__version__ = "0.1.0"
