"""The JSON bodies the HTTP API reads, as pydantic models (FastAPI's own validation library): each field's type
is declared once, and a body that breaks it is refused with OpenAI's error, one line naming the field.

Types are strict, as JSON has them: a bool is not an int, a string is not a number ("1" is refused), a number
field takes an int or a float. A field sent as null is the field left out (OpenAI's clients send null for an
unset option), and fields the server does not read are ignored (clients send more than it uses). What a value
may be beyond its type (max_tokens within the server's limit, the messages' contents) is checked where it is
used.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, \
    model_validator

from .policy import PolicyError


class Body(BaseModel):
    """A request body; `of(body)` validates a parsed JSON object. Each field's description says what it must be,
    the words of the 400 its breach gets: "'<field>' must be <description>" (code invalid_type)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def null_is_absent(cls, data: Any) -> Any:
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

    @classmethod
    def of(cls, body: dict[str, Any]) -> Self:
        try:
            return cls.model_validate(body)
        except ValidationError as error:
            name = str(error.errors()[0]["loc"][0])
            raise PolicyError(400, f"'{name}' must be {cls.model_fields[name].description}", "invalid_type",
                              name) from None


def _typed(description: str, default: Any = None) -> Any:
    """A field with `description` (see Body) and `default`; an empty list or dict is made afresh per body."""
    if default == [] or default == {}:
        return Field(default_factory=type(default), description=description)
    return Field(default, description=description)


class ChatRequest(Body):
    """POST /v1/chat/completions. model and max_tokens default to the server's settings (None here)."""

    model: StrictStr | None = _typed("str")
    messages: Any = None  # parse_messages checks them: their codes name the message and part at fault
    erasers: list[StrictStr] = _typed("a list of eraser names", [])
    n: StrictInt = _typed("int", 1)
    stop: Any = None  # refused unless empty: no type to check
    max_completion_tokens: StrictInt | None = _typed("int")
    max_tokens: StrictInt | None = _typed("int")
    temperature: StrictInt | StrictFloat = _typed("int or float", 0.0)
    top_p: StrictInt | StrictFloat = _typed("int or float", 1.0)
    seed: StrictInt | None = _typed("int")
    stream: StrictBool = _typed("bool", False)
    stream_options: dict[str, Any] = _typed("dict", {})


class AddEraser(Body):
    """POST /admin/erasers as JSON: a server-side path; name defaults to the file's stem."""

    path: StrictStr | None = _typed("str")
    name: StrictStr | None = _typed("str")
    tenants: list[Any] = _typed("list", [])  # the registry names the unknown keys


class FitRequest(Body):
    """POST /admin/requests: the forget set is checked by the fitter (fitter.RequestFitter.items)."""

    name: StrictStr | None = _typed("str")
    forget: Any = None
    tenants: list[Any] = _typed("list", [])


class Binding(Body):
    """POST /admin/bindings: a tenant's key and the eraser names to bind and unbind (the registry checks them)."""

    tenant: StrictStr | None = _typed("str")
    bind: list[Any] = _typed("list", [])
    unbind: list[Any] = _typed("list", [])
