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
