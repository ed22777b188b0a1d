"""The wire: JSON-RPC 2.0, one UTF-8 message per line, both ways.

Requests carry `id` (a string or an integer) and get exactly one response with the same
`id`; notifications from the daemon (`job.progress`, `job.done`) carry none.  Error codes
are JSON-RPC's own for malformed calls, and for failures of the work itself
``-(32000 + exit code)`` of the imagefs error (`NoSuchIndex`, exit code 3 → -32003), so a
client can map an error back to the CLI's exit codes; `data.type` names the error class.
"""

from __future__ import annotations

import json
from typing import Any

from imagefs.errors import Error, NotFound, SystemFailure

MAX_LINE = 1 << 20  # a longer request line is refused and its connection closed

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# The work failed: -(APP_BASE + the imagefs exit code).
APP_BASE = 32000
NOT_FOUND = -(APP_BASE + NotFound.exit_code)  # -32003: a path the caller names is missing
SYSTEM_FAILURE = -(APP_BASE + SystemFailure.exit_code)  # -32008: the system refused (OSError)
JOB_CANCELLED = -APP_BASE  # -32000: a job's error when it was cancelled (nothing changed)
# Daemon-specific failures, below the range of imagefs exit codes.
PERMISSION_DENIED = -32401
LINE_TOO_LONG = -32402
NO_SUCH_JOB = -32404
NOT_CANCELLABLE = -32409
TOO_BUSY = -32429
SHUTTING_DOWN = -32503

CODE_NAMES = {
    PARSE_ERROR: "the line is not valid JSON (or not UTF-8, or nested too deeply)",
    INVALID_REQUEST: "not a JSON-RPC 2.0 request object",
    METHOD_NOT_FOUND: "no such method (see docs/api.md)",
    INVALID_PARAMS: "a parameter is missing, unknown, or of the wrong type or value",
    INTERNAL_ERROR: "a bug in the daemon (logged); the daemon goes on",
    PERMISSION_DENIED: "the caller may not do this (not root, not in the daemon's group, "
                       "not the session's owner, or no permission on a path)",
    LINE_TOO_LONG: "a request line over 1 MiB; the connection is closed",
    NO_SUCH_JOB: "no such job (or not the caller's)",
    NOT_CANCELLABLE: "the job can no longer be cancelled (it is publishing, or over)",
    TOO_BUSY: "the daemon has as many connections as it takes; try again later",
    SHUTTING_DOWN: "the daemon is stopping and takes no new work",
}


class RpcError(Exception):
    """An error answer: its code, message and data (JSON-RPC's `error` object)."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}
        self.request_id: Any = None  # the id of the request it answers, once known

    @classmethod
    def from_error(cls, e: Error) -> RpcError:
        """The answer for an imagefs error: its exit code folded into the error code (and
        the output of the program that failed, for a servicing failure)."""
        data: dict[str, Any] = {"type": type(e).__name__, "exit_code": e.exit_code}
        output = getattr(e, "output", "")
        if isinstance(output, str) and output:
            data["output"] = output
        return cls(-(APP_BASE + e.exit_code), e.message(), data)

    @classmethod
    def from_os_error(cls, e: OSError) -> RpcError:
        """The answer for an OSError of the work: a SystemFailure, as the CLI reports it."""
        return cls(SYSTEM_FAILURE, f"{e.filename or ''}: {e.strerror}",
                   {"type": SystemFailure.__name__, "exit_code": SystemFailure.exit_code})

    @property
    def exit_code(self) -> int:
        """The CLI exit code this error stands for (a system failure's when none)."""
        code = self.data.get("exit_code")
        return code if isinstance(code, int) else SystemFailure.exit_code

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            doc["data"] = self.data
        return doc


def encode(doc: dict[str, Any]) -> bytes:
    """One message as a line, in ASCII: a path that is not UTF-8 travels as Python's
    surrogate escapes (`\\udcff` for the byte 0xff), so every line is valid UTF-8."""
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: Any, err: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": err.to_json()}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, method, params) of one request line; RpcError (with the id when one could be
    read, else None) for anything else.  A request without `id` is refused: every call
    gets an answer, so a client never waits on a notification it sent by mistake."""
    try:
        doc = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RpcError(PARSE_ERROR, f"parse error: {e}") from None
    except RecursionError:  # [[[[… : no request is nested this deep
        raise RpcError(PARSE_ERROR, "parse error: the line is nested too deeply "
                       "(arrays or objects inside each other)") from None
    if not isinstance(doc, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object, not "
                       f"{type(doc).__name__}")
    request_id = doc.get("id")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise RpcError(INVALID_REQUEST, "a request needs an `id` (a string or an integer)")
    if doc.get("jsonrpc") != "2.0":
        raise _with_id(RpcError(INVALID_REQUEST, 'a request needs "jsonrpc": "2.0"'),
                       request_id)
    method = doc.get("method")
    if not isinstance(method, str):
        raise _with_id(RpcError(INVALID_REQUEST, "`method` must be a string"), request_id)
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise _with_id(RpcError(INVALID_PARAMS, "`params` must be an object of named "
                                "parameters"), request_id)
    return request_id, method, params


def _with_id(err: RpcError, request_id: Any) -> RpcError:
    err.request_id = request_id
    return err
