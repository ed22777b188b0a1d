"""The method table: each method declares its parameters, and every call is checked against
them before the handler runs, so handlers never see a missing, unknown or mistyped value.

A module of methods (daemon/api_*.py, and servicing's later) registers with @method; the
server only looks names up here, so new methods plug in without touching the core.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .protocol import INVALID_PARAMS, RpcError

if TYPE_CHECKING:
    from .access import Peer
    from .server import Connection, Daemon

_MISSING: Any = object()


@dataclass(frozen=True)
class Param:
    """One named parameter: its JSON types, whether it is required, its default."""

    types: tuple[type, ...]
    required: bool = True
    default: Any = None
    doc: str = ""

    def check(self, method: str, name: str, value: Any) -> Any:
        if value is None and not self.required:
            return self.default
        ok = isinstance(value, self.types) and not (isinstance(value, bool)
                                                    and bool not in self.types)
        if not ok:
            want = " or ".join(_json_name(t) for t in self.types)
            raise RpcError(INVALID_PARAMS, f"{method}: `{name}` must be {want}, not "
                           f"{_json_name(type(value))}")
        return value


def _json_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "an object", type(None): "null"}.get(t, t.__name__)


def required(*types: type, doc: str = "") -> Param:
    return Param(types, True, None, doc)


def optional(*types: type, default: Any = None, doc: str = "") -> Param:
    return Param(types, False, default, doc)


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
