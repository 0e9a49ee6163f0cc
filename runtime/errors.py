"""The one base class of every input error the runtime raises (imports nothing, so a CLI can catch it cheaply)."""


class InputError(ValueError):
    """A value from the user (config, data, model path, layout, kernel choice) that cannot work; the message names
    the value and the fix. Subclasses say where it came from (ConfigError, DataError, ...)."""
