"""ApiError: an error for the client in OpenAI's vocabulary. Plain data (no web framework): the worker raises it in
its thread, and the app (add_error_handlers) turns it into the response."""
from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param)
