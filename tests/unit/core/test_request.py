"""SPEC §3.5 rules of the strict parse, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway_core.errors import InvalidRequest
from gateway_core.request import ROUTES, fold, parse_request

CHAT = ROUTES["/api/chat"]
V1 = ROUTES["/v1/chat/completions"]
BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _parse(body: Any, route: Any = CHAT) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return parse_request(route, raw)


def test_fold_binds_what_go_binds() -> None:
    assert fold("\u017ftream") == fold("stream") == fold("STREAM")
    assert fold("\u212aeep_alive") == fold("keep_alive")


@pytest.mark.parametrize("body,param", [
    ({**BASE, "Model": "x"}, "Model"),
    ({**BASE, "\u017ftream": True}, "\u017ftream"),
    ({**BASE, "options": {"Num_Ctx": 1}}, "Num_Ctx"),
    ({**BASE, "options": {"seed": 1, "SEED": 2}}, "SEED"),
    ({**BASE, "messages": [{"role": "user", "content": "a", "Content": "b"}]}, "Content"),
    ({**BASE, "options": {"num_predict": 0}}, "options.num_predict"),
    ({**BASE, "options": {"num_predict": -3}}, "options.num_predict"),
    ({**BASE, "options": "x"}, "options"),
])
def test_smuggling_and_bad_caps_are_refused_naming_the_key(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _parse(body)
    assert caught.value.param == param


@pytest.mark.parametrize("body", [
    {**BASE, "max_tokens": 0}, {**BASE, "max_tokens": 1.0}, {**BASE, "max_tokens": True},
    {**BASE, "max_completion_tokens": 10, "max_tokens": -1},
])
def test_openai_caps_are_whole_numbers_of_at_least_one(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        _parse(body, V1)


@pytest.mark.parametrize("raw", [
    b'{"model":"m","x":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    b'{"model":"m","x":' + b"[" * 64 + b"]" * 64 + b"}",
    b'{"model":"m","x":1e999}', b'{"model":"m","x":-Infinity}', b'{"model":"m","x":NaN}',
    b'{"model":"m","x":"\xc3"}', b'{"model":"m"', b"\xef\xbb\xbf{}",
])
def test_hostile_json_is_a_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(CHAT, raw)


def test_depth_64_is_accepted() -> None:
    assert _parse(b'{"model":"m","x":' + b"[" * 62 + b"]" * 62 + b"}").model == "m"


def test_the_smaller_cap_binds_and_a_budget_cap_never_goes_below_one() -> None:
    req = _parse({**BASE, "max_tokens": 50, "max_completion_tokens": 40}, V1)
    assert req.cap == 40
    sent = json.loads(req.upstream_body("m:latest", 0))
    assert sent["max_tokens"] == 1 and "max_completion_tokens" not in sent
    native = _parse({**BASE, "options": {"num_predict": -1, "num_ctx": 4096}, "keep_alive": 0})
    sent = json.loads(native.upstream_body("m:latest", 300))
    assert sent["options"] == {"num_predict": 300} and "keep_alive" not in sent
    assert json.loads(native.upstream_body("m:latest", None)).get("options") is None


GENERATE = ROUTES["/api/generate"]
EMBED = ROUTES["/api/embed"]


@pytest.mark.parametrize("route,body,param", [
    (CHAT, {**BASE, "options": {"seed": {}}}, "options.seed"),
    (CHAT, {**BASE, "options": {"temperature": "hot"}}, "options.temperature"),
    (CHAT, {**BASE, "options": {"top_k": 2.5}}, "options.top_k"),
    (CHAT, {**BASE, "options": {"repeat_penalty": False}}, "options.repeat_penalty"),
    (CHAT, {**BASE, "options": {"stop": [1]}}, "options.stop"),
    (CHAT, {**BASE, "format": "yaml"}, "format"),
    (CHAT, {**BASE, "think": "ultra"}, "think"),
    (CHAT, {**BASE, "tools": [1]}, "tools"),
    (CHAT, {**BASE, "messages": [{"role": "user", "content": ["a"]}]}, "messages[0].content"),
    (CHAT, {**BASE, "messages": [{"role": 1, "content": "a"}]}, "messages[0].role"),
    (V1, {**BASE, "temperature": "1"}, "temperature"),
    (V1, {**BASE, "stop": [None]}, "stop"),
    (V1, {**BASE, "seed": 0.5}, "seed"),
    (GENERATE, {"model": "m", "prompt": {"a": 1}}, "prompt"),
    (GENERATE, {"model": "m", "prompt": "a", "raw": "yes"}, "raw"),
    (EMBED, {"model": "m", "input": [["a"]]}, "input"),
])
def test_documented_types_are_checked_naming_the_field(route: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _parse(body, route)
    assert caught.value.param == param and param in caught.value.message


@pytest.mark.parametrize("raw", [b"null", b"0", b'"s"', b"false", b"[]"])
def test_a_scalar_or_list_body_is_a_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(CHAT, raw)


def test_well_typed_values_pass_and_only_documented_options_are_forwarded() -> None:
    req = _parse({**BASE, "format": {"type": "object"}, "think": "high", "options": {
        "seed": 3.0, "temperature": 1, "stop": [], "top_p": None, "mirostat": 2, "kv_cache_type": "q4_0",
        "num_ctx": 8}})
    sent = json.loads(req.upstream_body("m:latest", None))
    assert sent["options"] == {"seed": 3.0, "temperature": 1, "stop": [], "top_p": None}
    assert sent["format"] == {"type": "object"} and sent["think"] == "high"
    embed = _parse({"model": "m", "input": ["a", "b"], "options": {"num_predict": "x", "temperature": 0}},
                   EMBED)
    assert json.loads(embed.upstream_body("m:latest", None))["options"] == {"temperature": 0}
