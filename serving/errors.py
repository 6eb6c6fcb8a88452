"""Errors the HTTP API answers with: a status, a stable code, a message and (for 422) the field.

Every route answers errors as ``{"error": {"code", "message", "field"?}}``; :func:`error_responses`
describes them in the OpenAPI document, per route, with the statuses that route can answer.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class ApiError(Exception):
    """An error response: ``{"error": {"code", "message", "field"?}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}

    def as_dict(self) -> dict:
        """A picklable, JSON-able form (how a replica reports an error to the ingress)."""
        return {"status": self.status, "code": self.code, "message": self.message, "field": self.field, "headers": self.headers}

    @classmethod
    def from_dict(cls, d: dict) -> "ApiError":
        return cls(d["status"], d["code"], d["message"], field=d.get("field"), headers=d.get("headers"))


# --------------------------------------------------------------------------- OpenAPI description
class ErrorDetail(BaseModel):
    code: str = Field(description="stable error code, e.g. invalid_request, limit_exceeded, adapter_not_found")
    message: str = Field(description="what went wrong, in words")
    field: Optional[str] = Field(None, description="the request field at fault (422 only), dotted, e.g. adapters.0.name")


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


# status -> (description, codes that status carries, headers it sends)
ERRORS = {
    401: ("no or a wrong API key (only when the server sets http.api_key_env)", ["unauthorized"], {"WWW-Authenticate": "Bearer"}),
    404: ("unknown adapter, version or route", ["adapter_not_found", "not_found"], {}),
    405: ("method not allowed on this route", ["method_not_allowed"], {"Allow": "the methods the route accepts"}),
    422: ("invalid request: the body is not JSON or fails a check (field named), a limit is exceeded, or an adapter is "
          "broken or cannot be applied to this model",
          ["invalid_request", "limit_exceeded", "adapter_corrupt", "adapter_incompatible"], {}),
    500: ("internal error (a reference to the server log; no details)", ["internal"], {}),
    503: ("the queue is full or a generator replica died with the request; retry after Retry-After seconds",
          ["overloaded", "unavailable"], {"Retry-After": "seconds to wait before retrying"}),
    504: ("the request ran past its timeout (its work is cancelled)", ["timeout"], {}),
}


def error_responses(*statuses: int, auth: bool) -> dict:
    """FastAPI ``responses=`` describing ``statuses`` (plus 401 when ``auth``) with :class:`ErrorBody`."""
    wanted = sorted(set(statuses) | ({401} if auth else set()))
    out = {}
    for status in wanted:
        description, codes, headers = ERRORS[status]
        entry = {"model": ErrorBody, "description": f"{description}. Codes: {', '.join(codes)}."}
        if headers:
            entry["headers"] = {name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()}
        out[status] = entry
    return out
