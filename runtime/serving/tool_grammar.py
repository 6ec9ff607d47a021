"""The grammar of a forced call in Gemma 4's or FunctionGemma's syntax (tool_choice "required" or a named
function), in llguidance's Lark: the call and quote tokens by id, the function's name, and arguments that follow
its parameters.

    start: call                                        (call+ for "required": parallel calls)
    call: <[S]> "call:" ("get_weather" "{" f2 "}" | ...) <[E]>
    f2: "city:" <[Q]> TEXT? <[Q]> a1                   members in sorted order (the templates' dictsort); f: none
    f0: "days:" INTEGER |                              written yet, a: some were (so "," first); an optional
    a1: "," "days:" INTEGER |                          member may be skipped (the empty alternative)

Not enforced (the arguments may break them): a property without a type takes any value, an object without
`properties` any members; of the bounds only maxLength, an integer's minimum of 0 or 1 and minItems of 1 hold.
Strings hold no '<' (so that no text spells the quote token). Gemma 3's format is JSON: there the JSON schema is
enforced whole (tools.forced_spec).
"""

from __future__ import annotations

import json

TERMINALS = {
    "TEXT": r"/[^<]+/",
    "NUMBER": r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/",
    "INTEGER": r"/-?(0|[1-9][0-9]*)/",
    "NATURAL": r"/0|[1-9][0-9]*/",
    "POSITIVE": r"/[1-9][0-9]*/",
    "KEY": r"/[A-Za-z_][A-Za-z0-9_]*/",
}


def native_call_grammar(fmt, functions, several: bool) -> str:
    """Lark text: one call (or one or more with `several`) of one of `functions` (tools.Function) in `fmt`
    (tools.Native, whose `ids` give the tokens' ids)."""
    rules = _Rules(f"<[{fmt.ids[fmt.quote]}]>")
    start, end = (f"<[{fmt.ids[t]}]>" for t in fmt.call_tokens)
    names = " | ".join(f"{_literal(f.name)} {rules.object(f.parameters)}" for f in functions)
    head = [f"start: call{'+' if several else ''}", f'call: {start} "call:" ({names}) {end}']
    return "\n".join(head + rules.lines + [f"{name}: {regex}" for name, regex in TERMINALS.items()]) + "\n"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Rules:
    def __init__(self, quote: str):
        self.quote, self.lines, self.count, self.generic = quote, [], 0, False

    def add(self, prefix: str, body: str) -> str:
        name = f"{prefix}{self.count}"
        self.count += 1
        self.lines.append(f"{name}: {body}")
        return name

    def value(self, schema) -> str:
        if not isinstance(schema, dict) or not schema:
            return self.any()
        if "const" in schema:
            return self.literal(schema["const"])
        if "enum" in schema:
            return "(" + " | ".join(self.literal(v) for v in schema["enum"]) + ")"
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives:
            return "(" + " | ".join(self.value(s) for s in alternatives) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self.value({**schema, "type": t}) for t in kind) + ")"
        if kind == "string":
            limit = schema.get("maxLength")
            text = "TEXT?" if limit is None else (f"/[^<]{{1,{int(limit)}}}/?" if limit > 0 else "")
            return f"{self.quote} {text} {self.quote}"
        if kind == "integer":
            low = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
            return "POSITIVE" if low >= 1 else "NATURAL" if low >= 0 else "INTEGER"
        if kind == "number":
            return "NUMBER"
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.value(schema.get("items") or {})
            more = f'{item} ("," {item})*'
            return f'"[" {more} "]"' if schema.get("minItems", 0) >= 1 else f'"[" ({more})? "]"'
        if kind == "object" or "properties" in schema:
            return self.object(schema)
        return self.any()

    def literal(self, value) -> str:
        if isinstance(value, str):
            return f"{self.quote} {_literal(value)} {self.quote}"
        if isinstance(value, bool) or value is None:
            return _literal("true" if value is True else "false" if value is False else "null")
        return _literal(json.dumps(value))

    def object(self, schema) -> str:
        """Members in sorted order; the required ones always, the optional ones maybe."""
        if not isinstance(schema, dict) or "properties" not in schema:
            return self.any_object()
        members = sorted(schema["properties"].items())
        required = set(schema.get("required") or ())
        first, after = "", ""  # the rules for "from member i on": none written yet / some written
        for key, sub in reversed(members):
            member = f"{_literal(key + ':')} {self.value(sub)}"
            skip_first, skip_after = (first, after) if key not in required else (None, None)
            first_body = " | ".join(alt for alt in (f"{member} {after}".strip(), skip_first) if alt is not None)
            after_body = " | ".join(alt for alt in (f'"," {member} {after}'.strip(), skip_after) if alt is not None)
            first = self.add("f", first_body)
            after = self.add("a", after_body)
        return f'"{{" {first} "}}"' if members else '"{" "}"'

    def any(self) -> str:
        self._generic()
        return "gvalue"

    def any_object(self) -> str:
        self._generic()
        return "gobject"

    def _generic(self) -> None:
        if not self.generic:
            self.generic = True
            q = self.quote
            self.lines += [f'gvalue: {q} TEXT? {q} | NUMBER | "true" | "false" | "null" | gobject | garray',
                           'gobject: "{" (KEY ":" gvalue ("," KEY ":" gvalue)*)? "}"',
                           'garray: "[" (gvalue ("," gvalue)*)? "]"']
