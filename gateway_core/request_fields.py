"""The JSON types of the fields the gateway forwards (reference §1.6 to §1.10, §2.1 to §2.5).

Ollama answers a wrongly typed option, or a `format` that is neither "json" nor a schema, with a
500 (or an error line in a stream): a failure the circuit breaker counts against everyone. So the
types the backend documents are checked here, before admission, and such a request is a 400 that
names the field. Fields the backend ignores are not typed; unknown options are not forwarded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen


@frozen
class FieldType:
    accepts: Callable[[Any], bool]
    described: str  # completes "'<field>' must be …"


def _number(v: Any) -> bool:
    return type(v) is int or type(v) is float  # bool is not a number here (type(True) is bool)


def _whole(v: Any) -> bool:
    return type(v) is int or (type(v) is float and v.is_integer())


def _strings(v: Any) -> bool:
    return type(v) is list and all(type(s) is str for s in v)


def _objects(v: Any) -> bool:
    return type(v) is list and all(type(o) is dict for o in v)


NUMBER = FieldType(_number, "a number")
WHOLE = FieldType(_whole, "a whole number")
BOOLEAN = FieldType(lambda v: type(v) is bool, "true or false")
STRING = FieldType(lambda v: type(v) is str, "a string")
STRINGS = FieldType(_strings, "a list of strings")
STRING_OR_STRINGS = FieldType(lambda v: type(v) is str or _strings(v), "a string or a list of strings")
OBJECT = FieldType(lambda v: type(v) is dict, "an object")
OBJECTS = FieldType(_objects, "a list of objects")
WHOLES = FieldType(lambda v: type(v) is list and all(type(i) is int for i in v), "a list of whole numbers")
# Ollama accepts only these (an empty string and null mean "not set"); anything else fails in the runner.
FORMAT = FieldType(lambda v: type(v) is dict or (type(v) is str and v in ("", "json")),
                   'the string "json" or a JSON Schema object')
THINK = FieldType(lambda v: type(v) is bool or (type(v) is str and v in ("low", "medium", "high", "max")),
                  'true, false, "low", "medium", "high" or "max"')
CONTENT = FieldType(lambda v: type(v) is str or _objects(v), "a string or a list of content parts")

# Per-request sampling options, the only ones forwarded (runner options are stripped, unknown
# ones dropped). num_predict has its own rule (a cap, SPEC §3.5) in the request parse.
OPTION_TYPES: dict[str, FieldType] = {
    "num_keep": WHOLE, "seed": WHOLE, "top_k": WHOLE, "repeat_last_n": WHOLE,
    "top_p": NUMBER, "min_p": NUMBER, "typical_p": NUMBER, "temperature": NUMBER,
    "repeat_penalty": NUMBER, "presence_penalty": NUMBER, "frequency_penalty": NUMBER,
    "stop": STRINGS,
}
FORWARDED_OPTIONS = frozenset(OPTION_TYPES) | {"num_predict"}

_NATIVE_GENERATION = {"format": FORMAT, "think": THINK, "truncate": BOOLEAN, "shift": BOOLEAN,
                      "logprobs": BOOLEAN, "top_logprobs": WHOLE}
_OPENAI_SAMPLING = {"temperature": NUMBER, "top_p": NUMBER, "frequency_penalty": NUMBER,
                    "presence_penalty": NUMBER, "seed": WHOLE, "stop": STRING_OR_STRINGS}

# Top-level fields per route path; `messages` entries are typed by MESSAGE_TYPES.
FIELD_TYPES: dict[str, dict[str, FieldType]] = {
    "/api/chat": {"messages": OBJECTS, "tools": OBJECTS, **_NATIVE_GENERATION},
    "/api/generate": {"prompt": STRING, "suffix": STRING, "system": STRING, "template": STRING,
                      "raw": BOOLEAN, "images": STRINGS, "context": WHOLES, **_NATIVE_GENERATION},
    "/api/embed": {"input": STRING_OR_STRINGS, "truncate": BOOLEAN, "dimensions": WHOLE},
    "/api/embeddings": {"prompt": STRING},
    "/v1/chat/completions": {"messages": OBJECTS, "tools": OBJECTS, "response_format": OBJECT,
                             "reasoning_effort": STRING, "logprobs": BOOLEAN, "top_logprobs": WHOLE,
                             **_OPENAI_SAMPLING},
    "/v1/completions": {"prompt": STRING, "suffix": STRING, **_OPENAI_SAMPLING},
    "/v1/embeddings": {"input": STRING_OR_STRINGS, "encoding_format": STRING, "dimensions": WHOLE},
}
TYPED_FIELDS = frozenset(name for fields in FIELD_TYPES.values() for name in fields)

MESSAGE_TYPES: dict[str, dict[str, FieldType]] = {
    "native": {"role": STRING, "content": STRING, "thinking": STRING, "images": STRINGS,
               "tool_calls": OBJECTS, "tool_name": STRING, "tool_call_id": STRING},
    "openai": {"role": STRING, "content": CONTENT, "name": STRING, "tool_calls": OBJECTS,
               "tool_call_id": STRING},
}


def mistyped(obj: dict[str, Any], types: dict[str, FieldType]) -> tuple[str, FieldType] | None:
    """The first field of *obj* whose value *types* refuses (null means "not set" and passes)."""
    for name, value in obj.items():
        expected = types.get(name)
        if expected is not None and value is not None and not expected.accepts(value):
            return name, expected
    return None
