"""A body that is valid JSON but not an object is a 400 naming the problem, never a 500."""

from __future__ import annotations

import pytest

from gateway_core.errors import InvalidRequest
from gateway_core.request import ROUTES, parse_request


@pytest.mark.parametrize("raw", [b"null", b"1", b"-2.5", b'"text"', b"true", b"[]", b"[1, {}]"])
def test_a_body_that_is_not_an_object_is_refused_clearly(raw: bytes) -> None:
    for route in (ROUTES.values() if isinstance(ROUTES, dict) else ROUTES):
        with pytest.raises(InvalidRequest, match="must be a JSON object"):
            parse_request(route, raw)
