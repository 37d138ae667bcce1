"""Exception types of the toolkit.

Every error a user can cause (a wrong path, a mismatched model pair, a malformed prompt file, a
layer index out of range) raises a subclass of `SafeReactError` whose message names the value
and says how to fix it. The CLI prints these messages without a traceback.
"""


class SafeReactError(Exception):
    """Base class of all errors raised for invalid input or state."""


class ModelLoadError(SafeReactError):
    """A model or adapter could not be found or loaded."""


class PairMismatchError(SafeReactError):
    """The base and post-trained models are not comparable (tokenizer, layers, width)."""


class PromptFileError(SafeReactError):
    """A prompt file is missing, empty, unreadable or has no usable column."""


class LayerError(SafeReactError):
    """A layer index is outside the model's layers."""


class DirectionError(SafeReactError):
    """A direction could not be computed, for example because it has zero norm."""


class RunFolderError(SafeReactError):
    """A run folder exists when it should not, or lacks the output of an earlier stage."""


class TokenizationMismatchError(SafeReactError):
    """A prompt tokenizes differently in two models that activation patching compares."""


class ConfigError(SafeReactError):
    """A parameter value is invalid."""
