"""User-facing errors: each carries a one-line message that ``run.py`` prints without a traceback."""


class PTQBenchError(Exception):
    """Base class for problems caused by the user's input (config, data, checkpoint)."""


class ConfigError(PTQBenchError):
    """An unknown name or an impossible value in the configuration."""


class DataError(PTQBenchError):
    """A missing dataset path, an empty split or an unreadable image."""


class CheckpointError(PTQBenchError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class CoverageError(PTQBenchError):
    """A quantizer that never saw data or never ran: the model would not be what its record says."""


class InvariantError(PTQBenchError):
    """A transform that must keep the FP function changed it."""


class NumericalError(PTQBenchError):
    """NaN or Inf in weights, calibration statistics or model outputs: no number is better than a wrong one."""


class OutputError(PTQBenchError):
    """A result that could not be written (a full disk, a folder turned read-only): nothing half-written is left."""
