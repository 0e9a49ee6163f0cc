"""The one base class of every input error the runtime raises, and the one JSON-object reader with one-line errors
(imports nothing at module level, so a CLI can catch them cheaply)."""


class InputError(ValueError):
    """A value from the user (config, data, model path, layout, kernel choice) that cannot work; the message names
    the value and the fix. Subclasses say where it came from (ConfigError, DataError, ...)."""


def read_json_object(path, error: type[InputError], what: str) -> dict:
    """The JSON object in file `path`; `error` (one line naming `what`) when it is not valid JSON or not an object."""
    import json
    from pathlib import Path

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{what} must hold a JSON object")
    return value
