"""The generated parts of docs/api.md: the method reference and the error table.

Both are rendered from the code (the METHODS registry, protocol.CODE_NAMES, the imagefs
error classes) and tests/test_daemon_docs.py compares them with what the page holds, so a
method, parameter or error code added without documenting it fails the tests.  Regenerate
with `python -c 'from daemon.apidoc import method_reference; print(method_reference())'`
(or error_table) and paste between the page's marker comments.
"""

from __future__ import annotations

import json

from imagefs.errors import error_classes

from . import protocol, server  # noqa: F401  (server imports every api_* module)
from .rpc import METHODS, Param, range_text

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean",
               list: "array", dict: "object", type(None): "null"}


def _json_types(types: tuple[type, ...]) -> str:
    """JSON's names for the accepted Python types; an integer is a number already."""
    names = [_JSON_TYPES.get(t, t.__name__) for t in types
             if not (t is int and float in types)]
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


def _type(p: Param) -> str:
    """The JSON types, and for a number with a range of its own the range."""
    if p.minimum is None and p.maximum is None:
        return _json_types(p.types)
    return f"{_json_types(p.types)}, {range_text(p.minimum, p.maximum)}"


def _requirement(p: Param) -> str:
    """`required`, or the default in JSON (an absent or null value means the default)."""
    return "required" if p.required else f"default `{json.dumps(p.default)}`"


def method_reference() -> str:
    """One `### name` section per method, sorted by name: its summary and its parameters."""
    parts = []
    for name in sorted(METHODS):
        m = METHODS[name]
        lines = [f"### {name}", "", " ".join(m.summary.split()), ""]
        if not m.params:
            lines.append("No parameters.")
        else:
            with_doc = any(p.doc for p in m.params.values())
            lines.append("| parameter | type | required or default |"
                         + (" meaning |" if with_doc else ""))
            lines.append("| --- | --- | --- |" + (" --- |" if with_doc else ""))
            for pname, p in m.params.items():
                lines.append(f"| `{pname}` | {_type(p)} | {_requirement(p)} |"
                             + (f" {p.doc} |" if with_doc else ""))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _constant_names() -> dict[int, str]:
    """protocol's constant name for each error code (PARSE_ERROR for -32700, ...)."""
    return {v: k for k, v in vars(protocol).items()
            if k.isupper() and isinstance(v, int) and v in protocol.CODE_NAMES}


def error_table() -> str:
    """The daemon's own codes, then the imagefs errors folded into -(32000 + exit code)."""
    names = _constant_names()
    rows = ["| code | name | meaning |", "| --- | --- | --- |"]
    rows += [f"| {code} | `{names[code]}` | {meaning} |"
             for code, meaning in protocol.CODE_NAMES.items()]
    by_exit: dict[int, list[str]] = {}
    for cls in error_classes():
        by_exit.setdefault(cls.exit_code, []).append(f"`{cls.__name__}`")
    rows += ["", f"A failure of the work itself is an imagefs error: its code is "
             f"`-({protocol.APP_BASE} + exit code)`, the exit code the CLI would exit with "
             "(docs/cli.md, \"Exit codes\"), and `data` holds `type` (the error class) and "
             "`exit_code`.", "", "| code | exit code | errors (`data.type`) |",
             "| --- | --- | --- |"]
    rows += [f"| {-(protocol.APP_BASE + code)} | {code} | {', '.join(classes)} |"
             for code, classes in sorted(by_exit.items())]
    return "\n".join(rows)
