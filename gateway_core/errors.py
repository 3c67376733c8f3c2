"""The gateway's error tree; each class carries the SPEC §3.3 `code` and what its response needs.

GatewayError
├── InvalidRequest (400)      ├── RateLimitExceeded (429)
├── InvalidApiKey (401)       │   └── BudgetExhausted (429)
├── ModelNotAllowed (403)     ├── UpstreamUnavailable (502)
├── ScopeNotAllowed (403)     │   └── UpstreamUnreachable (502: not sent, may be retried elsewhere)
│                             ├── DependencyUnavailable (503)
├── NotFound (404)            └── InternalError (500)
└── RequestTooLarge (413)
AdminError — operator input rejected by the CLI use cases (never reaches HTTP).
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base of every error a caller can see. `message` is safe to show to that caller."""

    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry
        self.param = param
        # Extra response headers the caller should see with this error (rate-limit state, §3.4).
        self.headers = headers or {}
        super().__init__(self.message)


class InvalidRequest(GatewayError):
    code = "invalid_request"
    type = "invalid_request_error"
    default_message = "invalid request"


class InvalidApiKey(GatewayError):
    code = "invalid_api_key"
    type = "invalid_request_error"
    default_message = "Invalid API key provided."


class ModelNotAllowed(GatewayError):
    code = "model_not_allowed"
    type = "invalid_request_error"
    default_message = "The model does not exist or you do not have access to it."


class ScopeNotAllowed(GatewayError):
    code = "scope_not_allowed"
    type = "invalid_request_error"
    default_message = "This API key is not allowed to use this endpoint."


class NotFound(GatewayError):
    code = "not_found"
    type = "invalid_request_error"
    default_message = "Not found."


class RequestTooLarge(GatewayError):
    code = "request_too_large"
    type = "invalid_request_error"
    default_message = "Request body is too large."


class RateLimitExceeded(GatewayError):
    code = "rate_limit_exceeded"
    type = "requests"
    default_message = "Rate limit exceeded."


class BudgetExhausted(RateLimitExceeded):
    code = "budget_exhausted"
    type = "insufficient_quota"
    default_message = "Token budget exhausted."


class UpstreamUnavailable(GatewayError):
    code = "upstream_unavailable"
    type = "server_error"
    default_message = "The model backend is unavailable. Try again later."


class UpstreamUnreachable(UpstreamUnavailable):
    """The connection failed before any of the request was sent (SPEC §4.10: retried once elsewhere)."""


class DependencyUnavailable(GatewayError):
    code = "dependency_unavailable"
    type = "server_error"
    default_message = "The gateway cannot check this request right now. Try again later."

    def __init__(self, message: str | None = None, *, dependency: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        # Which dependency refused ("redis", "postgres", "change_feed"): for the log, never the body.
        self.dependency = dependency

    @property
    def error_class(self) -> str | None:
        """The class of the failure underneath (ConnectionError, TimeoutError, …), for the log."""
        return type(self.__cause__).__name__ if self.__cause__ is not None else None


class InternalError(GatewayError):
    """Anything unexpected (500): the caller gets this shape, never a framework page or a traceback."""

    code = "internal_error"
    type = "server_error"
    default_message = "The gateway failed unexpectedly; the request id identifies it in our logs."


class AdminError(Exception):
    """Operator input that the CLI refuses; the message is one line meant for the operator."""


class ModelNotFound(NotFound):
    """`GET /v1/models/{id}` for a model outside the caller's effective set, shaped as OpenAI's 404."""

    code = "model_not_found"
    default_message = "The model does not exist or you do not have access to it."
