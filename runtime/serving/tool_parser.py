"""Reading a reply for tool calls as it grows (runtime/serving/tools.py uses these): `scan_native` for Gemma 4's
and FunctionGemma's call tokens, `scan_json` for Gemma 3's JSON call. Each returns what the text says so far, in a
form that only grows by appending as the text does, so that a stream can send the differences."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass
class Scan:
    """What a reply's text says so far: `content` text that is final, and calls as (name, arguments so far,
    complete). Each grows only by appending as the text grows, so a stream can send the differences."""

    content: str = ""
    calls: list[tuple[str, str, bool]] = field(default_factory=list)


def scan_native(text: str, call_tokens: tuple[str, str], quote: str, names: set[str], final: bool) -> Scan:
    """Gemma 4 / FunctionGemma: text outside the call tokens is content; a call is taken whole once its end token
    came (at the end of the reply, an unterminated call is parsed as it is); a call that does not parse, or names
    no function, is text."""
    start, end = call_tokens
    out, pos = Scan(), 0
    while True:
        at = text.find(start, pos)
        if at < 0:
            tail = text[pos:]
            held = 0 if final else next((n for n in range(len(start) - 1, 0, -1) if tail.endswith(start[:n])), 0)
            out.content += tail[:len(tail) - held]
            return out
        out.content += text[pos:at]
        stop = text.find(end, at)
        if stop < 0 and not final:
            return out
        body = text[at + len(start): stop if stop >= 0 else len(text)]
        call = _native_call(body, quote, names)
        if call is None:
            out.content += text[at: stop + len(end) if stop >= 0 else len(text)]
        else:
            out.calls.append((call[0], json.dumps(call[1], ensure_ascii=False), True))
        if stop < 0:
            return out
        pos = stop + len(end)


def _native_call(body: str, quote: str, names: set[str]):
    match = re.match(r"\s*call:([\w.-]+)\{", body)
    if not match or match.group(1) not in names:
        return None
    try:
        arguments, rest = NativeParser(body, quote).object(match.end())
    except ValueError:
        return None
    return (match.group(1), arguments) if not body[rest:].strip() else None


class NativeParser:
    """Gemma 4's / FunctionGemma's values: QUOTE text QUOTE, {key:value,...} with bare (or quoted) keys,
    [value,...], and bare true, false, null (None, nil) and numbers; anything else bare is a string."""

    def __init__(self, text: str, quote: str):
        self.text, self.quote = text, quote

    def object(self, i: int) -> tuple[dict, int]:
        """The members after an opening brace at i - 1, up to its closing brace; (dict, index after it)."""
        out, i = {}, self._space(i)
        while not self.text.startswith("}", i):
            if self.text.startswith(self.quote, i):
                key, i = self._string(i)
            else:
                colon = self.text.find(":", i)
                if colon < 0:
                    raise ValueError("a key without a value")
                key, i = self.text[i:colon].strip(), colon
            if not self.text.startswith(":", i):
                raise ValueError(f"expected ':' at {i}")
            out[key], i = self.value(i + 1)
            i = self._separator(i, "}")
        return out, i + 1

    def value(self, i: int):
        i = self._space(i)
        if self.text.startswith(self.quote, i):
            return self._string(i)
        if self.text.startswith("{", i):
            return self.object(i + 1)
        if self.text.startswith("[", i):
            items, i = [], self._space(i + 1)
            while not self.text.startswith("]", i):
                item, i = self.value(i)
                items.append(item)
                i = self._separator(i, "]")
            return items, i + 1
        match = re.compile(r"[^,}\]]*").match(self.text, i)
        word = match.group().strip()
        if not word or match.end() >= len(self.text):
            raise ValueError(f"a value is missing or unterminated at {i}")
        return _bare(word), match.end()

    def _string(self, i: int) -> tuple[str, int]:
        stop = self.text.find(self.quote, i + len(self.quote))
        if stop < 0:
            raise ValueError("an unterminated string")
        return self.text[i + len(self.quote): stop], stop + len(self.quote)

    def _separator(self, i: int, close: str) -> int:
        i = self._space(i)
        if self.text.startswith(",", i):
            return self._space(i + 1)
        if self.text.startswith(close, i):
            return i
        raise ValueError(f"expected ',' or {close!r} at {i}")

    def _space(self, i: int) -> int:
        while i < len(self.text) and self.text[i].isspace():
            i += 1
        if i >= len(self.text):
            raise ValueError("the text ends inside a value")
        return i


def _bare(word: str):
    if word in ("true", "false"):
        return word == "true"
    if word.lower() in ("null", "none", "nil"):
        return None
    try:
        return int(word)
    except ValueError:
        pass
    try:
        return float(word)
    except ValueError:
        return word


FENCE = re.compile(r"```([\w-]*)[ \t]*\n")
FENCE_LANGUAGES = ("", "json", "tool_code", "tool_call")


def scan_json(text: str, names: set[str], final: bool) -> Scan:
    """Gemma 3: a reply that starts with a JSON object (bare, or in a ```json fence) naming one of the functions is a call:
    its name once written, its parameters' text as it comes; text after the object (and its fence) is content.
    Any other reply is content, whole."""
    body = text.lstrip()
    if not final and body and "```".startswith(body):
        return Scan()
    fenced = body.startswith("```")
    if fenced:
        fence = FENCE.match(body)
        if fence is None:  # the fence's first line is not complete yet
            return Scan() if not final and "\n" not in body else Scan(text)
        if fence.group(1) not in FENCE_LANGUAGES:
            return Scan(text)
        body = body[fence.end():].lstrip()
    if not body:
        return Scan() if not final else Scan(text)
    if not body.startswith("{"):
        return Scan(text)
    members, end = _json_members(body)
    name_span, arguments_span = members.get("name"), members.get("parameters", members.get("arguments"))
    name = _json_name(body, name_span)
    complete = end is not None
    if name not in names:
        return Scan(text) if complete or final else Scan()
    if arguments_span is None:
        arguments = "{}" if complete or final else ""
    else:
        arguments = body[arguments_span[0]: arguments_span[1] if arguments_span[1] is not None else len(body)]
    if not complete:
        return Scan("", [(name, arguments, False)])
    rest = body[end:]
    if fenced:
        stripped = rest.lstrip()
        if stripped.startswith("```"):
            rest = stripped[3:]
        elif not final and "```".startswith(stripped):
            rest = ""
    return Scan(rest, [(name, arguments, True)])


def _json_name(body: str, span) -> str | None:
    if span is None or span[1] is None:
        return None
    try:
        name = json.loads(body[span[0]: span[1]])
    except json.JSONDecodeError:
        return None
    return name if isinstance(name, str) else None


def _json_members(body: str) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The top-level members of the object at body[0] as key -> (value start, value end or None while the value
    is incomplete), and the index after the object (None while it is incomplete or malformed)."""
    members, i = {}, _skip_space(body, 1)
    while i < len(body):
        if body[i] == "}":
            return members, i + 1
        if body[i] == ",":
            i = _skip_space(body, i + 1)
            continue
        key_end = _value_end(body, i) if body[i] == '"' else None
        if key_end is None:
            return members, None
        colon = _skip_space(body, key_end)
        if colon >= len(body) or body[colon] != ":":
            return members, None
        start = _skip_space(body, colon + 1)
        if start >= len(body):
            return members, None
        end = _value_end(body, start)
        members[json.loads(body[i:key_end])] = (start, end)
        if end is None:
            return members, None
        i = _skip_space(body, end)
    return members, None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at text[i], or None when the text ends before it does."""
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
            if depth < 0:
                return j
        elif depth == 0 and c in ", \t\r\n":
            return j
    return None
