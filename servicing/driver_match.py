"""Which modules a device's modalias names, as `modprobe -R MODALIAS` (kmod 30) answers.

kmod looks a modalias up in modules.alias.bin first and, only when nothing matches there,
in modules.builtin.alias.bin (the aliases modules.builtin.modinfo records for built-in
drivers).  Both sides are normalised first ('-' becomes '_' outside brackets, kmod's
alias_normalize).  An index entry matches when its literal prefix (up to its first '*',
'?' or '[': kmod walks a trie that far) equals the key's, and the rest matches as
glibc's fnmatch(pattern, key, 0) does.  The matching modules come out ordered by their
priority (the module's place in depmod's order, which is modules.dep's) and each is
named once here (modprobe repeats a module once per matching alias line).

The patterns are hostile input (an image's modules.alias, a repository's module), so the
glob is not handed to a backtracking matcher: each '*'-free segment is a fixed-length
regular expression, and the segments between stars are placed leftmost one after the
other (always right for fixed-length segments), the last one anchored at the end.  That
is linear in the key for each segment, whatever the pattern.  tests check the result
against glibc's fnmatch on random patterns and against modprobe on every inventory.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

WILD = "*?["
NEVER = "never"  # a bracket glibc's fnmatch never matches
MAX_PATTERN = 4096  # kmod's PATH_MAX


def normalize(alias: str) -> str | None:
    """kmod's alias_normalize: '-' as '_' outside brackets; None for an unmatched ']' or
    an unterminated '['."""
    out = []
    i = 0
    while i < len(alias):
        c = alias[i]
        if c == "-":
            out.append("_")
        elif c == "]":
            return None
        elif c == "[":
            end = alias.find("]", i)
            if end < 0:
                return None
            out.append(alias[i:end + 1])
            i = end
        else:
            out.append(c)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=65536)
def compile_glob(pattern: str) -> Glob:
    return Glob(pattern)


class Glob:
    """A glibc fnmatch pattern (flags 0) compiled into fixed-length segments."""

    def __init__(self, pattern: str) -> None:
        self.valid = len(pattern) <= MAX_PATTERN
        parts: list[list[str]] = [[]]
        i = 0
        while self.valid and i < len(pattern):
            c = pattern[i]
            if c == "*":
                parts.append([])
                i += 1
                continue
            piece, i = _piece(pattern, i)
            if piece is None:
                self.valid = False
                break
            parts[-1].append(piece)
        self.starred = len(parts) > 1
        self.segments = [re.compile("".join(p), re.S) for p in parts]
        self.lengths = [len(p) for p in parts]

    def match(self, text: str) -> bool:
        if not self.valid:
            return False
        segs, lens = self.segments, self.lengths
        if not self.starred:
            return lens[0] == len(text) and segs[0].fullmatch(text) is not None
        first, last = segs[0], segs[-1]
        if len(text) < sum(lens) or not first.match(text):
            return False
        pos = lens[0]
        for seg, n in zip(segs[1:-1], lens[1:-1], strict=True):
            found = seg.search(text, pos)
            if found is None:
                return False
            pos = found.start() + n
        end = len(text) - lens[-1]
        return end >= pos and last.fullmatch(text, end) is not None


def _piece(pattern: str, i: int) -> tuple[str | None, int]:
    """The regular expression of the one character pattern[i:] matches, and where the
    next begins; None when the pattern can match nothing (a trailing backslash)."""
    c = pattern[i]
    if c == "?":
        return ".", i + 1
    if c == "\\":
        if i + 1 >= len(pattern):
            return None, i + 1
        return re.escape(pattern[i + 1]), i + 2
    if c == "[":
        found = _bracket(pattern, i)
        if isinstance(found, str):  # NEVER
            return None, i + 1
        if found is not None:
            return found
    return re.escape(c), i + 1


def _bracket(pattern: str, i: int) -> tuple[str, int] | str | None:
    """A bracket expression at pattern[i] == '[': (its regex, the index after it); None
    when it is not closed (then '[' is an ordinary character, as in glibc), NEVER when
    glibc gives up on it (an unclosed one ending in a range, a backslash or a class)."""
    j = i + 1
    negate = j < len(pattern) and pattern[j] in "!^"
    if negate:
        j += 1
    items: list[str] = []
    first = True
    while j < len(pattern):
        c = pattern[j]
        if c == "]" and not first:
            body = "".join(items)
            if not body:  # only empty ranges ([b-a]): nothing is in the set
                return ("." if negate else "(?!)"), j + 1
            return (f"[^{body}]" if negate else f"[{body}]"), j + 1
        first = False
        if c == "[" and pattern[j + 1:j + 2] in (":", "=", "."):
            # Character classes, equivalence classes and collating symbols: kernel aliases
            # never hold them, and glibc's corner cases with them are many; such a pattern
            # matches nothing here.
            return NEVER
        if c == "\\":
            if j + 1 >= len(pattern):
                return NEVER
            j += 1
            c = pattern[j]
        lo = c
        j += 1
        if j + 1 == len(pattern) and pattern[j] == "-":
            return NEVER
        if (j + 1 < len(pattern) and pattern[j] == "-" and pattern[j + 1] != "]"):
            hi = pattern[j + 1]
            j += 2
            if hi == "\\" and j < len(pattern):
                hi = pattern[j]
                j += 1
            items.append(f"{re.escape(lo)}-{re.escape(hi)}" if lo <= hi else "")
            continue
        items.append(re.escape(lo))
    return None


def _prefix(pattern: str) -> tuple[str, str]:
    """(the literal part before the first wildcard, the rest): what kmod's trie compares
    character for character, and what it hands to fnmatch."""
    cut = min((pattern.find(w) for w in WILD if w in pattern), default=len(pattern))
    return pattern[:cut], pattern[cut:]


def alias_matches(pattern: str, key: str) -> bool:
    """True when the normalised alias pattern matches the normalised key as kmod's index
    search does."""
    head, rest = _prefix(pattern)
    if not key.startswith(head):
        return False
    if not rest:
        return len(key) == len(head)
    return compile_glob(rest).match(key[len(head):])


@dataclass
class AliasTable:
    """Alias patterns and the modules they name, each with its priority (lower first).
    Entries are filed by their literal prefix, so a lookup tries only those whose prefix
    the key starts with (as kmod's trie does)."""

    entries: list[tuple[str, str, int]] = field(default_factory=list)
    _by_head: dict[str, list[tuple[int, str]]] | None = field(default=None, repr=False,
                                                              compare=False)

    def add(self, pattern: str, module: str, priority: int) -> None:
        norm = normalize(pattern)
        if norm is not None and len(norm) <= MAX_PATTERN:
            self.entries.append((norm, module, priority))
            self._by_head = None

    def without(self, modules: Iterable[str]) -> AliasTable:
        gone = set(modules)
        return AliasTable([e for e in self.entries if e[1] not in gone])

    def _filed(self) -> dict[str, list[tuple[int, str]]]:
        if self._by_head is None:
            self._by_head = {}
            for n, (pattern, _module, _prio) in enumerate(self.entries):
                head, rest = _prefix(pattern)
                self._by_head.setdefault(head, []).append((n, rest))
        return self._by_head

    def resolve(self, modalias: str) -> list[str]:
        """The modules whose aliases match modalias, in priority order, once each."""
        key = normalize(modalias)
        if key is None:
            return []
        filed = self._filed()
        found = []
        for cut in range(len(key) + 1):
            for n, rest in filed.get(key[:cut], ()):
                if (compile_glob(rest).match(key[cut:]) if rest else cut == len(key)):
                    pattern, module, prio = self.entries[n]
                    found.append((prio, n, module))
        out: list[str] = []
        for _prio, _n, module in sorted(found):
            if module not in out:
                out.append(module)
        return out


def lookup(modalias: str, aliases: AliasTable, builtin: AliasTable) -> tuple[list[str], bool]:
    """(modules, built_in) as `modprobe -R` finds them: modules.alias first, the built-in
    aliases only when that found nothing."""
    found = aliases.resolve(modalias)
    if found:
        return found, False
    found = builtin.resolve(modalias)
    return found, bool(found)
