"""URL path templates of ``google.api.http`` rules: parsing and matching.

The grammar (google/api/http.proto)::

    Template  = "/" Segments [ Verb ] ;
    Segments  = Segment { "/" Segment } ;
    Segment   = "*" | "**" | LITERAL | Variable ;
    Variable  = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb      = ":" LITERAL ;

``*`` matches one path segment, ``**`` any number of them (only as the last
segment); ``{field}`` is ``{field=*}``. A variable's value is its segments,
percent-decoded and joined with ``/``. Matching works on the request's raw
path: it is split on ``/`` first and each segment decoded, so an encoded
``%2F`` stays inside its segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import unquote

WILD = "*"
DEEP = "**"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL = re.compile(r"[^/{}*=]+")

FieldPath = tuple[str, ...]


class TemplateError(ValueError):
    """A path template that does not follow the grammar."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A ``{field.path=...}`` binding over ``segments[start:end]`` (``end``
    None: through the end of the path, for a trailing ``**``)."""

    field_path: FieldPath
    start: int
    end: int | None


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A parsed template; `parse_template` builds it, `match` applies it."""

    text: str
    segments: tuple[str, ...]  # literal text, WILD or DEEP
    variables: tuple[Variable, ...]
    verb: str | None

    @property
    def specificity(self) -> tuple[int, int]:
        """Sort key: templates with more literal segments, then without ``**``,
        win when several match the same path."""
        literals = sum(1 for s in self.segments if s not in (WILD, DEEP))
        return (-literals, int(DEEP in self.segments))

    def match(self, path: str) -> dict[FieldPath, str] | None:
        """The variables' values when the raw ``path`` (no query) matches, else None."""
        if self.verb is not None:
            suffix = ":" + self.verb
            if not path.endswith(suffix):
                return None
            path = path[: -len(suffix)]
        if not path.startswith("/"):
            return None
        parts = [unquote(p) for p in path[1:].split("/")]
        if not self._fits(parts):
            return None
        return {v.field_path: "/".join(parts[v.start : v.end]) for v in self.variables}

    def _fits(self, parts: list[str]) -> bool:
        deep = bool(self.segments) and self.segments[-1] == DEEP
        fixed = self.segments[:-1] if deep else self.segments
        if len(parts) < len(fixed) or (not deep and len(parts) != len(fixed)):
            return False
        return all(s == WILD or s == p for s, p in zip(fixed, parts, strict=False))


def parse_template(text: str) -> PathTemplate:
    """Parse ``text``; `TemplateError` says what is wrong with it."""
    if not text.startswith("/"):
        raise TemplateError(f"path template {text!r} must start with '/'")
    body, verb = _split_verb(text)
    parser = _Parser(text, body)
    segments, variables = parser.parse()
    if DEEP in segments[:-1]:
        raise TemplateError(f"path template {text!r}: '**' must be the last segment")
    return PathTemplate(text, tuple(segments), tuple(variables), verb)


def _split_verb(text: str) -> tuple[str, str | None]:
    """The path part and the verb (the ``:LITERAL`` after the last segment)."""
    tail = max(text.rfind("/"), text.rfind("}"))
    colon = text.find(":", tail + 1)
    if colon < 0:
        return text[1:], None
    verb = text[colon + 1 :]
    if not _LITERAL.fullmatch(verb) or ":" in verb:
        raise TemplateError(f"path template {text!r} has an invalid verb {verb!r}")
    return text[1:colon], verb


class _Parser:
    """Recursive descent over the path part (after the leading ``/``)."""

    def __init__(self, template: str, body: str) -> None:
        self._template = template
        self._text = body
        self._pos = 0
        self._segments: list[str] = []
        self._variables: list[Variable] = []
        self._in_variable = False

    def parse(self) -> tuple[list[str], list[Variable]]:
        self._segments_until("")
        if self._pos != len(self._text):
            self._fail("unexpected text")
        return self._segments, self._variables

    def _segments_until(self, stop: str) -> None:
        while True:
            self._segment()
            if self._peek("/"):
                self._pos += 1
                continue
            if self._pos == len(self._text) or self._peek(stop):
                return
            self._fail("expected '/'")

    def _segment(self) -> None:
        if self._peek(DEEP):
            self._pos += 2
            self._segments.append(DEEP)
        elif self._peek(WILD):
            self._pos += 1
            self._segments.append(WILD)
        elif self._peek("{"):
            if self._in_variable:
                self._fail("nested variables")
            self._variable()
        else:
            match = _LITERAL.match(self._text, self._pos)
            if match is None:
                self._fail("expected a segment")
            self._pos = match.end()
            self._segments.append(match.group())

    def _variable(self) -> None:
        self._pos += 1
        path: list[str] = []
        while True:
            match = _IDENT.match(self._text, self._pos)
            if match is None:
                self._fail("expected a field name")
            path.append(match.group())
            self._pos = match.end()
            if not self._peek("."):
                break
            self._pos += 1
        start = len(self._segments)
        if self._peek("="):
            self._pos += 1
            self._in_variable = True
            self._segments_until("}")
            self._in_variable = False
        else:
            self._segments.append(WILD)
        if not self._peek("}"):
            self._fail("expected '}'")
        self._pos += 1
        if any(v.field_path == tuple(path) for v in self._variables):
            self._fail(f"variable {'.'.join(path)} bound twice")
        end = None if self._segments[-1] == DEEP else len(self._segments)
        self._variables.append(Variable(tuple(path), start, end))

    def _peek(self, token: str) -> bool:
        return bool(token) and self._text.startswith(token, self._pos)

    def _fail(self, what: str) -> NoReturn:
        raise TemplateError(f"path template {self._template!r}: {what} at offset {self._pos + 1}")
