"""The method table: each method declares its parameters, and every call is checked against
them before the handler runs, so handlers never see a missing, unknown or mistyped value.

A module of methods (daemon/api_*.py, and servicing's later) registers with @method; the
server only looks names up here, so new methods plug in without touching the core.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .protocol import INVALID_PARAMS, RpcError

if TYPE_CHECKING:
    from .peers import Peer
    from .state import Daemon

_MISSING: Any = object()

# An integer parameter without a range of its own must still fit in 64 bits: JSON allows
# numbers of any length, and a 401-digit one is no index, level or count of anything.
INT_LIMIT = (1 << 63) - 1


@dataclass(frozen=True)
class Param:
    """One named parameter: its JSON types, whether it is required, its default, and for a
    number the range it must lie in (NaN and the infinities never do)."""

    types: tuple[type, ...]
    required: bool = True
    default: Any = None
    doc: str = ""
    minimum: float | None = None
    maximum: float | None = None

    def check(self, method: str, name: str, value: Any) -> Any:
        if value is None and not self.required:
            return self.default
        ok = isinstance(value, self.types) and not (isinstance(value, bool)
                                                    and bool not in self.types)
        if not ok:
            want = " or ".join(_json_name(t) for t in self.types  # an integer is a number
                               if not (t is int and float in self.types))
            raise RpcError(INVALID_PARAMS, f"{method}: `{name}` must be {want}, not "
                           f"{_json_name(type(value))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._check_number(method, name, value)
        return value

    def _check_number(self, method: str, name: str, value: float) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise RpcError(INVALID_PARAMS, f"{method}: `{name}` must be a finite number, "
                           f"not {_shown(value)}")
        low, high = self.minimum, self.maximum
        if low is None and high is None and isinstance(value, int):
            low, high = -INT_LIMIT, INT_LIMIT
        if (low is not None and value < low) or (high is not None and value > high):
            raise RpcError(INVALID_PARAMS, f"{method}: `{name}` must be "
                           f"{range_text(low, high)}, not {_shown(value)}")


def range_text(low: float | None, high: float | None) -> str:
    """`from 0 to 60`, `at least 1`, `at most 9` (numbers as JSON writes them)."""
    if low is not None and high is not None:
        return f"from {_shown(low)} to {_shown(high)}"
    return f"at least {_shown(low)}" if low is not None else f"at most {_shown(high)}"


def _shown(value: float | None) -> str:
    """A number for a message: as JSON writes it, but a huge integer by its length."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    if value is not None and abs(value) > INT_LIMIT:
        return f"a {len(str(abs(value)))}-digit integer"
    return str(value)


def _json_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "an object", type(None): "null"}.get(t, t.__name__)


def required(*types: type, doc: str = "", minimum: float | None = None,
             maximum: float | None = None) -> Param:
    return Param(types, True, None, doc, minimum, maximum)


def optional(*types: type, default: Any = None, doc: str = "", minimum: float | None = None,
             maximum: float | None = None) -> Param:
    return Param(types, False, default, doc, minimum, maximum)


class Connection(Protocol):
    """What a handler may do with the connection its call came on (server.Connection)."""

    def notify(self, method: str, params: dict[str, Any]) -> None:
        """Send the client a notification (job.progress, job.done)."""


@dataclass(frozen=True)
class Call:
    """What a handler knows of its call: the daemon, the connection and who is asking."""

    daemon: Daemon
    connection: Connection
    peer: Peer


Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    params: dict[str, Param]
    summary: str

    def bind(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise RpcError(INVALID_PARAMS, f"{self.name}: unknown parameter(s) "
                           f"{', '.join(unknown)}; it takes {', '.join(self.params) or 'none'}")
        out = {}
        for name, p in self.params.items():
            value = params.get(name, _MISSING)
            if value is _MISSING:
                if p.required:
                    raise RpcError(INVALID_PARAMS, f"{self.name}: missing parameter `{name}`")
                value = None
            out[name] = p.check(self.name, name, value)
        return out


METHODS: dict[str, Method] = {}


def method(name: str, /, **params: Param) -> Callable[[Handler], Handler]:
    """Register handler(call, **params) as the JSON-RPC method `name`."""

    def register(handler: Handler) -> Handler:
        if name in METHODS:
            raise ValueError(f"method {name} registered twice")
        summary = " ".join((handler.__doc__ or "").strip().split("\n\n")[0].split())
        METHODS[name] = Method(name, handler, params, summary)
        return handler

    return register
