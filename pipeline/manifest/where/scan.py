"""Scanning a `where` expression before Python's parser reads it: backtick column names become
placeholder identifiers, comments and line breaks become spaces, brackets are counted, and
every position of the text given to the parser maps back to the user's own text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pipeline.manifest.where.language import MAX_WHERE_DEPTH, fail, shorten

# Blanks outside string literals, replaced by spaces before parsing.
_BLANKS: Final = "\t\n\r\f\v"


def _placeholder_prefix(text: str) -> str:
    """A prefix of identifiers for backtick names that appears nowhere in `text`."""
    k = 0
    while f"_w{k}q" in text:
        k += 1
    return f"_w{k}q"


def _string_end(text: str, start: int) -> int:
    """The index just after the string literal opening at `start` (or the end of the text)."""
    quote = text[start]
    delim = quote * 3 if text.startswith(quote * 3, start) else quote
    i = start + len(delim)
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if text.startswith(delim, i):
            return i + len(delim)
        if len(delim) == 1 and ch in "\r\n":
            return i  # unterminated: the parser reports it
        i += 1
    return len(text)


@dataclass
class ScannedText:
    """The text given to the parser, and how its positions map back to the user's text."""

    text: str  # what the user wrote
    python: str  # with backtick names replaced by placeholders
    origin: list[int]  # index in `text` of each index of `python` (and of its end)
    names: dict[str, str]  # placeholder -> column name

    @classmethod
    def scan(cls, text: str) -> ScannedText:
        prefix = _placeholder_prefix(text)
        out: list[str] = []
        origin: list[int] = []
        names: dict[str, str] = {}
        placeholders: dict[str, str] = {}
        depth = 0
        i = 0
        while i < len(text):
            ch = text[i]
            if ch in "'\"":
                end = _string_end(text, i)
            elif ch == "#" or ch in _BLANKS:
                # A comment or a line break: blanked, so the expression may span lines.
                newline = text.find("\n", i) if ch == "#" else -1
                end = i + 1 if ch != "#" else len(text) if newline < 0 else newline
                out.append(" " * (end - i))
                origin.extend(range(i, end))
                i = end
                continue
            elif ch == "`":
                close = text.find("`", i + 1)
                if close < 0:
                    raise fail(f"unclosed backtick at character {i + 1}", shorten(text))
                name = text[i + 1 : close]
                if not name:
                    raise fail(f"empty column name in backticks at character {i + 1}")
                placeholder = placeholders.get(name)
                if placeholder is None:
                    placeholder = placeholders[name] = f"{prefix}{len(names)}"
                    names[placeholder] = name
                # Spaces keep the placeholder a token of its own.
                out.append(f" {placeholder} ")
                origin.extend([i] * (len(placeholder) + 1))
                origin.append(close + 1)
                i = close + 1
                continue
            else:
                if ch in "([{":
                    depth += 1
                    if depth > MAX_WHERE_DEPTH:
                        raise fail(f"too deep (more than {MAX_WHERE_DEPTH} nested brackets)")
                elif ch in ")]}":
                    depth = max(0, depth - 1)
                end = i + 1
            out.append(text[i:end])
            origin.extend(range(i, end))
            i = end
        origin.append(len(text))
        python = "".join(out)
        lead = len(python) - len(python.lstrip(" "))  # the parser refuses an indent
        return cls(text, python[lead:], origin[lead:], names)

    def line_starts(self) -> list[int]:
        """Index in `python` of each line's start, lines split as the parser splits them."""
        starts = [0]
        i = 0
        source = self.python
        while i < len(source):
            if source[i] == "\r" and source.startswith("\r\n", i):
                i += 2
                starts.append(i)
                continue
            if source[i] in "\r\n":
                starts.append(i + 1)
            i += 1
        return starts

    def index(self, lineno: int, col_bytes: int, starts: list[int]) -> int:
        """Index in `python` of a parser position (1-based line, UTF-8 byte column)."""
        if lineno < 1 or lineno > len(starts):
            return len(self.python)
        start = starts[lineno - 1]
        end = starts[lineno] if lineno < len(starts) else len(self.python)
        line = self.python[start:end]
        chars = len(line.encode("utf-8")[:col_bytes].decode("utf-8", errors="ignore"))
        return min(start + chars, len(self.python))
