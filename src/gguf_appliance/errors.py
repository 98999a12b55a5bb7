from __future__ import annotations


class ApplianceError(Exception):
    """An error a user or operator can cause, with the HTTP status it maps to.

    `code` is a short machine-readable name; the message is one line a person can act on.
    """

    status_code = 500
    code = "internal_error"
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ApplianceError):
    status_code = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    """Raised without `param`: the API names its own prompt field (`prompt`, `messages`)."""

    code = "context_length_exceeded"


class InvalidPrompt(InvalidRequest):
    """A prompt the model cannot take (a token id outside its vocabulary, too many prompts);
    raised without `param`, as PromptTooLong."""


class EmptyPrompt(InvalidPrompt):
    """Raised without `param`, as PromptTooLong."""


class BodyTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status_code = 415
    code = "unsupported_media_type"


class MisdirectedRequest(InvalidRequest):
    status_code = 421
    code = "misdirected_request"


class ClientDisconnected(ApplianceError):
    status_code = 499  # NGINX's code for it: logged and counted, never seen by the client
    code = "client_disconnected"


class Unauthorized(ApplianceError):
    status_code = 401
    code = "invalid_api_key"
    error_type = "authentication_error"


class NotFound(ApplianceError):
    status_code = 404
    code = "not_found"
    error_type = "invalid_request_error"


class Unavailable(ApplianceError):
    """The node cannot take the request now; the client should retry (elsewhere)."""

    status_code = 503
    code = "unavailable"
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Unavailable):
    code = "queue_full"


class RateLimited(Unavailable):
    """A client (an API key) over its own request rate or streams: retry after a while."""

    status_code = 429
    code = "rate_limited"
    error_type = "rate_limit_error"


class NotReady(Unavailable):
    code = "not_ready"


class Draining(Unavailable):
    code = "draining"


class ModelError(ApplianceError):
    """The model file is missing, corrupt or unusable."""

    code = "model_error"
