"""Which JSON Schema keywords xgrammar 0.2.8 would not enforce: `unenforceable(schema)` names each,
with where it is, so a schema is refused rather than silently half-enforced (a schema xgrammar ignores
in part gives output that breaks it). Each rule was established by compiling probe schemas and
comparing the grammar's verdict on instances with jsonschema's.

jsonschema is imported on first use: the engine (and the kernels-only GPU check) loads this module
without needing it.
"""

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

# A keyword that xgrammar ignores makes it accept output the schema rejects; keywords it enforces, or
# enforces more strictly (patterns taken as anchored, formats), are fine. Keywords outside ASSERTIONS (title, description, default, $id,
# $schema, $comment, examples, unknown ones ...) assert nothing for jsonschema either.

# Ignored wherever they appear (true/any value): output need not satisfy them.
_IGNORED = {"uniqueItems": "is not supported", "contains": "is not supported", "not": "is not supported",
            "if": "is not supported (nor then/else)", "dependentRequired": "is not supported",
            "dependentSchemas": "is not supported", "dependencies": "is not supported",
            "$dynamicRef": "is not supported", "$recursiveRef": "is not supported"}
# Enforced only where "type" names a type they apply to: {"minimum": 3} alone lets 1 through.
_NEEDS_TYPE = {keyword: types for types, keywords in (
    (("integer", "number"), ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")),
    (("string",), ("minLength", "maxLength", "pattern")),
    (("array",), ("minItems", "maxItems")),
    (("object",), ("minProperties", "maxProperties", "propertyNames")),
) for keyword in keywords}
# What jsonschema checks (all drafts); the rest of a schema's keys are annotations to both.
ASSERTIONS = frozenset(_IGNORED) | frozenset(_NEEDS_TYPE) | {
    "type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "properties", "patternProperties",
    "additionalProperties", "unevaluatedProperties", "required", "items", "prefixItems", "additionalItems",
    "unevaluatedItems", "minContains", "maxContains", "then", "else"}
_COMBINATORS = ("anyOf", "oneOf", "allOf")
_MULTIPLE_OF_MAX = 1024  # xgrammar ignores an integer multipleOf above this (its modulo automaton's size)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_VALUES = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
                  "additionalItems")

Problem = tuple[str, str, str]  # (keyword, JSON pointer of the schema holding it, why)


@lru_cache(maxsize=1024)
def unenforceable(schema: str) -> tuple[Problem, ...]:
    """The keywords of a schema (canonical JSON text) that xgrammar would not enforce, with where they
    are; () when the grammar keeps every output valid under the schema."""
    import jsonschema

    root = json.loads(schema)
    validator = jsonschema.validators.validator_for(root, default=jsonschema.Draft202012Validator)(root)
    return tuple(_walk(root, "", _Context(root, validator), nested_id=False))


class _Context:
    def __init__(self, root: Any, validator: Any) -> None:  # a jsonschema.protocols.Validator
        self.root = root
        self.validator = validator  # resolves $ref against the root when checking enum values

    def resolve(self, node: Any, depth: int = 0) -> Any:
        """node with local $refs followed (None where one cannot be: xgrammar or the walk reports it)."""
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and depth < 32:
            ref, depth = node["$ref"], depth + 1
            if not (ref == "#" or ref.startswith("#/")):
                return None
            node = self.root
            for part in filter(None, ref[2:].split("/")):
                part = part.replace("~1", "/").replace("~0", "~")
                try:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                except (KeyError, IndexError, ValueError, TypeError):
                    return None
        return node


def _walk(node: Any, pointer: str, context: _Context, nested_id: bool) -> Iterator[Problem]:
    if not isinstance(node, dict):
        return  # true / false: xgrammar handles both (false it refuses, naming it)
    nested_id = nested_id or (bool(pointer) and "$id" in node)
    assertions = ASSERTIONS.intersection(node)
    for keyword in ("$defs", "definitions"):  # checked wherever they are: any $ref may lead there
        for name, subschema in _schema_map(node.get(keyword)):
            yield from _walk(subschema, f"{pointer}/{keyword}/{_escape(name)}", context, nested_id)
    if "enum" in node or "const" in node:
        # xgrammar emits one of the listed values and ignores every other keyword beside them, so the
        # schema holds when each value satisfies the rest of it.
        yield from _check_values(node, pointer, context)
        return
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            yield "$ref", pointer, f"is {ref!r}: only '#' and '#/...' JSON pointers are supported"
        elif nested_id:
            yield "$ref", pointer, "is not supported inside a subschema with its own $id (it resolves against the root)"
        for keyword in sorted(assertions - {"$ref"}):
            yield keyword, pointer, "beside $ref is not supported (xgrammar ignores it): move it into the target"
        return
    present = [keyword for keyword in _COMBINATORS if keyword in node]
    if present:
        for keyword in sorted(assertions - set(present)) + present[1:]:
            yield keyword, pointer, (f"beside {present[0]} is not supported (xgrammar ignores it): "
                                     "move it into each branch")
        if len(node.get("allOf") or ()) > 1:
            yield "allOf", pointer, "with more than one schema is not supported (xgrammar enforces none of them)"
        if isinstance(node.get("oneOf"), list):
            yield from _check_one_of(node["oneOf"], pointer, context)
        yield from _walk_children(node, pointer, context, nested_id)
        return  # every other assertion here is reported above
    for keyword in sorted(assertions.intersection(_IGNORED)):
        if keyword == "uniqueItems" and node[keyword] is False:
            continue  # asserts nothing
        yield keyword, pointer, _IGNORED[keyword]
    types = node.get("type", [])
    types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
    if pointer.endswith("/propertyNames") and not types:
        types = {"string"}  # xgrammar constrains property names as strings whether or not "type" says so
    for keyword in sorted(assertions.intersection(_NEEDS_TYPE)):
        if not types:
            needs = " or ".join(_NEEDS_TYPE[keyword])
            yield keyword, pointer, f'needs a "type" ({needs}): xgrammar ignores it without one'
    if "multipleOf" in node and types & {"integer", "number"}:
        value = node["multipleOf"]
        if "number" in types:
            yield "multipleOf", pointer, "is supported for type integer only (xgrammar ignores it on numbers)"
        elif not (isinstance(value, (int, float)) and float(value).is_integer() and 0 < value <= _MULTIPLE_OF_MAX):
            yield "multipleOf", pointer, (f"must be a whole number from 1 to {_MULTIPLE_OF_MAX} "
                                          "(xgrammar ignores others)")
    if isinstance(node.get("required"), list):
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        for name in node["required"]:
            if name not in properties:
                yield "required", pointer, f"names {name!r}, which is not in properties (xgrammar does not enforce it)"
    yield from _walk_children(node, pointer, context, nested_id)


def _walk_children(node: dict, pointer: str, context: _Context, nested_id: bool) -> Iterator[Problem]:
    for keyword in ("properties", "patternProperties"):
        for name, subschema in _schema_map(node.get(keyword)):
            yield from _walk(subschema, f"{pointer}/{keyword}/{_escape(name)}", context, nested_id)
    for keyword in _SCHEMA_LISTS:
        if isinstance(node.get(keyword), list):
            for i, subschema in enumerate(node[keyword]):
                yield from _walk(subschema, f"{pointer}/{keyword}/{i}", context, nested_id)
    for keyword in _SCHEMA_VALUES:
        if keyword in node:
            yield from _walk(node[keyword], f"{pointer}/{keyword}", context, nested_id)


def _check_values(node: dict, pointer: str, context: _Context) -> Iterator[Problem]:
    for keyword in ("const", "enum"):
        if keyword not in node:
            continue
        rest = {key: value for key, value in node.items() if key != keyword}
        if not ASSERTIONS.intersection(rest):
            continue
        values = [node[keyword]] if keyword == "const" else node[keyword] if isinstance(node[keyword], list) else []
        checker = context.validator.evolve(schema=rest)
        for value in values:
            if not checker.is_valid(value):
                yield keyword, pointer, (f"value {json.dumps(value)} breaks the schema's other keywords, which "
                                         f"xgrammar ignores beside {keyword}: leave it out")


def _check_one_of(branches: list, pointer: str, context: _Context) -> Iterator[Problem]:
    """xgrammar treats oneOf as anyOf, which is the same only when no output can match two branches:
    provably so when the branches' types, their values (const / enum) or a required discriminator
    property with const / enum values tell them apart."""
    resolved = [context.resolve(branch) for branch in branches]
    for i in range(len(resolved)):
        for j in range(i + 1, len(resolved)):
            if not _disjoint(resolved[i], resolved[j], context):
                yield "oneOf", pointer, (f"branches {i} and {j} may both match, and xgrammar enforces oneOf as "
                                         "anyOf: use anyOf, or tell them apart by type, const/enum or a required "
                                         "const property")
                return


def _disjoint(a: Any, b: Any, context: _Context) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None:
        return not any(_same(x, y) for x in values_a for y in values_b)
    types_a, types_b = _types(a, values_a), _types(b, values_b)
    if types_a is not None and types_b is not None and not _types_overlap(types_a, types_b):
        return True
    if types_a == types_b == {"object"}:
        properties_a, properties_b = a.get("properties") or {}, b.get("properties") or {}
        for name in set(a.get("required") or ()) & set(b.get("required") or ()):
            tag_a, tag_b = (_values(context.resolve(p.get(name))) if isinstance(p, dict) else None
                            for p in (properties_a, properties_b))
            if tag_a is not None and tag_b is not None and not any(_same(x, y) for x in tag_a for y in tag_b):
                return True
    return False


def _values(node: Any) -> list | None:
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return [node["const"]]
    return node["enum"] if isinstance(node.get("enum"), list) else None


def _types(node: dict, values: list | None) -> set[str] | None:
    if values is not None:
        return {_json_type(value) for value in values}
    types = node.get("type")
    return {types} if isinstance(types, str) else set(types) if isinstance(types, list) and types else None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if float(value).is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _types_overlap(a: set[str], b: set[str]) -> bool:
    numeric = {"integer", "number"}
    return bool(a & b) or bool(a & numeric and b & numeric)


def _same(a: Any, b: Any) -> bool:
    """JSON equality (1 == 1.0, but true != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _schema_map(value: Any) -> Iterator[tuple[str, Any]]:
    return iter(value.items()) if isinstance(value, dict) else iter(())


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
