"""The errors the CLI turns into one clear line on stderr (full traceback only with ``--debug``)."""


class FtengineError(Exception):
    """Base of every error caused by the user's input or environment, not by a bug.

    .. versionadded:: 0.1
    """


class ConfigError(FtengineError):
    """The run config is invalid; the message lists every problem, one per line, with its key.

    .. versionadded:: 0.1
    """


class PluginError(FtengineError):
    """A plugin registration conflict, a broken plugin, or a name no plugin registered.

    .. versionadded:: 0.1
    """


class DataError(FtengineError):
    """A dataset that cannot be read or a row that cannot be converted (names file, row, field).

    .. versionadded:: 0.1
    """


class ModelError(FtengineError):
    """A model that cannot be found or loaded.

    .. versionadded:: 0.1
    """


class ExportError(FtengineError):
    """An export that cannot be written (checked before anything is written).

    .. versionadded:: 0.1
    """


class HostMemoryError(FtengineError, MemoryError):
    """The host lacks the memory a setting needs (offloaded checkpointing's page-locked inputs).

    .. versionadded:: 0.1
    """


class NonFiniteError(FtengineError):
    """Training produced a non-finite loss, gradient norm, learning rate or weight; or an export was
    asked to write non-finite weights."""


class RunLockedError(FtengineError):
    """Another process is training or exporting in the same run directory."""


class DiskFullError(FtengineError):
    """A write ran out of disk space (the message names the path, the bytes free and needed)."""


class StoppedAtOnce(KeyboardInterrupt):
    """A second interrupt stopped a run at once; ``run_dir`` and its last complete ``checkpoint`` (or None)."""

    def __init__(self, run_dir: object, checkpoint: object):
        super().__init__(f"{run_dir}: stopped at once; last complete checkpoint: {checkpoint}")
        self.run_dir, self.checkpoint = run_dir, checkpoint
