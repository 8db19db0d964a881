"""Typed adapter errors; serve/errors.py maps each to an HTTP status and OpenAI error JSON."""
from __future__ import annotations


class AdapterError(ValueError):
    """A bad adapter or upload: the client's fault, nothing was changed. `status_code` is the HTTP
    status the server answers with; `param` names the offending field when there is one."""
    status_code = 400
    code = "invalid_adapter"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # crosses the engine-process pipe intact, whatever the subclass's __init__
        return (_restore, (type(self), self.message, self.__dict__))


def _restore(cls: type, message: str, state: dict) -> AdapterError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class UnsupportedAdapterError(AdapterError):
    """A valid PEFT adapter using a feature we do not serve (DoRA, modules_to_save, rank too high)."""
    status_code = 422
    code = "unsupported_adapter"


class AdapterTooLargeError(AdapterError):
    status_code = 413
    code = "adapter_too_large"


class AdapterNotFoundError(AdapterError):
    status_code = 404
    code = "adapter_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"The adapter `{name}` does not exist.", param="name")
        self.name = name
