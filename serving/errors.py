"""Errors the HTTP API answers with: a status, a stable code, a message and (for 422) the field."""

from __future__ import annotations


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
