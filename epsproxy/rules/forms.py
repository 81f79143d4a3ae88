"""
Declarative validation of JSON-like data: settings, JSON-RPC params and change records.

A schema both checks a value and *normalises* it, and the normalised value is what the
rest of the program sees (for change records it is also what gets hashed, SPEC §3.1).
Two flavours of mapping exist because the two kinds of input want different things:

- ``Map(..., strict=False)`` follows the reference's forms library: keys the schema does
  not declare are silently dropped, and an optional field that is missing, ``null`` or
  ``""`` counts as absent (its default, if any, is inserted).  Records and network params
  use this, because the record hash depends on exactly this normalisation.
- ``Map(..., strict=True)`` refuses unknown keys.  Settings use it, so a typo such as
  ``validate_client`` stops the program with a message instead of being ignored.

Every failure raises :class:`FormError`, which carries the key path of the offending
value so that callers can say *where* the problem is.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "FormError",
    "Schema",
    "Field",
    "String",
    "Integer",
    "Float",
    "Boolean",
    "StringList",
    "List",
    "Map",
    "DictOf",
    "AnyMap",
    "AnyValue",
    "Check",
    "Index",
    "MISSING",
    "element_label",
]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

PathItem = str | int

_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,62}")  # never a number: [1] is an index


class Index(int):
    """
    A list index that also knows the element's name: equal to (and hashed as) the index,
    so lookups by path still work, but shown as ``[name]`` in messages
    (``channels[gateway].settings``), which is what the reader wrote.
    """

    label: str

    def __new__(cls, index: int, label: str) -> "Index":
        item = super().__new__(cls, index)
        item.label = label
        return item


def element_label(value: Any, key: str) -> str | None:
    """``value[key]`` when it can name a list element in a message (a short plain name)."""
    if isinstance(value, dict):
        label = value.get(key)
        if isinstance(label, str) and _LABEL.fullmatch(label):
            return label
    return None


def format_path(path: Sequence[PathItem]) -> str:
    """Render a key path as ``a.b[2].c`` (or ``a.b[name].c``) for messages."""
    text = ""
    for item in path:
        if isinstance(item, Index):
            text += f"[{item.label}]"
        elif isinstance(item, int):
            text += f"[{item}]"
        else:
            text += f".{item}" if text else str(item)
    return text or "(top level)"


class FormError(ValueError):
    """A value does not fit its schema; ``path`` says where, ``message`` what is wrong."""

    def __init__(self, message: str, path: Sequence[PathItem] = ()) -> None:
        super().__init__(message, tuple(path))
        self.message = message
        self.path: tuple[PathItem, ...] = tuple(path)

    def __str__(self) -> str:
        return f"{format_path(self.path)}: {self.message}"

    def as_data(self) -> dict[str, Any]:
        """The error as a JSON object for JSON-RPC ``error.data``."""
        return {"path": format_path(self.path), "message": self.message}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


class Schema:
    """Base class: ``validate`` returns the normalised value or raises FormError."""

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> Any:
        raise NotImplementedError

    def __call__(self, value: Any) -> Any:
        return self.validate(value, ())


class String(Schema):
    """A JSON string, optionally restricted by pattern (``fullmatch``), choices or length."""

    def __init__(
        self,
        *,
        pattern: str | None = None,
        choices: Iterable[str] | None = None,
        min_length: int = 0,
        max_length: int | None = None,
    ) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.choices = frozenset(choices) if choices is not None else None
        self.min_length = min_length
        self.max_length = max_length

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> str:
        if not isinstance(value, str):
            raise FormError(f"expected a string, got {_type_name(value)}", path)
        if len(value) < self.min_length:
            raise FormError(f"must be at least {self.min_length} characters long", path)
        if self.max_length is not None and len(value) > self.max_length:
            raise FormError(f"must be at most {self.max_length} characters long", path)
        if self.choices is not None and value not in self.choices:
            raise FormError(f"must be one of {', '.join(sorted(self.choices))}", path)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise FormError(f"does not match {self.pattern.pattern!r}", path)
        return value


class Integer(Schema):
    """A whole number (a JSON number without fraction), optionally bounded."""

    def __init__(self, *, min: int | None = None, max: int | None = None) -> None:
        self.min = min
        self.max = max

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormError(f"expected an integer, got {_type_name(value)}", path)
        if isinstance(value, float):
            if not value.is_integer():
                raise FormError("expected an integer, got a fraction", path)
            value = int(value)
        if self.min is not None and value < self.min:
            raise FormError(f"must be at least {self.min}", path)
        if self.max is not None and value > self.max:
            raise FormError(f"must be at most {self.max}", path)
        return value


class Float(Schema):
    """Any JSON number, optionally bounded; returned as a float."""

    def __init__(self, *, min: float | None = None, max: float | None = None) -> None:
        self.min = min
        self.max = max

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormError(f"expected a number, got {_type_name(value)}", path)
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise FormError("must be a finite number", path)
        if self.min is not None and value < self.min:
            raise FormError(f"must be at least {self.min:g}", path)
        if self.max is not None and value > self.max:
            raise FormError(f"must be at most {self.max:g}", path)
        return value


class Boolean(Schema):
    """``true`` or ``false`` (YAML's ``yes``/``on`` are already booleans after loading)."""

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> bool:
        if not isinstance(value, bool):
            raise FormError(f"expected true or false, got {_type_name(value)}", path)
        return value


class StringList(Schema):
    """
    A list of strings.

    ``lenient=True`` reproduces the reference quirk (SPEC §3.1): a value that is not a
    list at all becomes ``[]`` without error.  Elements must still be strings.
    """

    def __init__(self, *, lenient: bool = False, item: String | None = None) -> None:
        self.lenient = lenient
        self.item = item or String()

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> list[str]:
        if not isinstance(value, list):
            if self.lenient:
                return []
            raise FormError(f"expected a list of strings, got {_type_name(value)}", path)
        return [self.item.validate(v, (*path, i)) for i, v in enumerate(value)]


class List(Schema):
    """
    A list whose elements all fit ``item``.  With ``name_key``, an element that is a
    mapping is named in error paths by its ``name_key`` value instead of its index
    (``channels[gateway]``), when that value is a plain name.
    """

    def __init__(
        self,
        item: Schema,
        *,
        min_length: int = 0,
        max_length: int | None = None,
        name_key: str | None = None,
    ) -> None:
        self.item = item
        self.min_length = min_length
        self.max_length = max_length
        self.name_key = name_key

    def index(self, value: Any, index: int) -> PathItem:
        """The path item of element ``index`` (an :class:`Index` when it has a name)."""
        label = element_label(value, self.name_key) if self.name_key else None
        return Index(index, label) if label is not None else index

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> list[Any]:
        if not isinstance(value, list):
            raise FormError(f"expected a list, got {_type_name(value)}", path)
        if len(value) < self.min_length:
            raise FormError(f"needs at least {self.min_length} element(s)", path)
        if self.max_length is not None and len(value) > self.max_length:
            raise FormError(f"may have at most {self.max_length} elements", path)
        return [self.item.validate(v, (*path, self.index(v, i))) for i, v in enumerate(value)]


class Field:
    """
    One key of a :class:`Map`.

    A required field must be present and not ``null``.  An optional field that is
    missing, ``null`` or ``""`` is absent: ``default`` is inserted when given (a copy, so
    mutable defaults are safe), otherwise the key is left out of the result.
    """

    def __init__(
        self,
        schema: Schema,
        *,
        required: bool = False,
        default: Any = MISSING,
        doc: str = "",
    ) -> None:
        self.schema = schema
        self.required = required
        self.default = default
        self.doc = doc


def Required(schema: Schema, doc: str = "") -> Field:
    """Shorthand for ``Field(schema, required=True)``."""
    return Field(schema, required=True, doc=doc)


def Optional(schema: Schema, default: Any = MISSING, doc: str = "") -> Field:
    """Shorthand for ``Field(schema, default=...)``."""
    return Field(schema, default=default, doc=doc)


__all__ += ["Required", "Optional", "format_path"]


class Map(Schema):
    """
    A mapping with declared keys.

    ``strict=True`` refuses undeclared keys; ``strict=False`` drops them silently.
    """

    def __init__(self, fields: Mapping[str, Field | Schema], *, strict: bool = False) -> None:
        self.fields: dict[str, Field] = {
            key: f if isinstance(f, Field) else Field(f, required=True)
            for key, f in fields.items()
        }
        self.strict = strict

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise FormError(f"expected a mapping, got {_type_name(value)}", path)
        if self.strict:
            for key in value:
                if key not in self.fields:
                    known = ", ".join(sorted(self.fields)) or "none"
                    raise FormError(f"unknown key (known keys: {known})", (*path, key))
        result: dict[str, Any] = {}
        for key, field in self.fields.items():
            item = value.get(key, MISSING)
            if field.required:
                if item is MISSING or item is None:
                    raise FormError("is required", (*path, key))
            elif item is MISSING or item is None or item == "":
                if field.default is not MISSING:
                    result[key] = copy.deepcopy(field.default)
                continue
            result[key] = field.schema.validate(item, (*path, key))
        return result


class DictOf(Schema):
    """A mapping with arbitrary string keys whose values all fit ``value``."""

    def __init__(self, value: Schema) -> None:
        self.value = value

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise FormError(f"expected a mapping, got {_type_name(value)}", path)
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormError("keys must be strings", (*path, str(key)))
            result[key] = self.value.validate(item, (*path, key))
        return result


class AnyMap(Schema):
    """A free-form JSON object, kept verbatim (nested content included)."""

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise FormError(f"expected a mapping, got {_type_name(value)}", path)
        return value


class AnyValue(Schema):
    """Anything at all, kept verbatim."""

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> Any:
        return value


class Check(Schema):
    """
    Run ``inner`` and then ``check(value)``; a check raises ``ValueError`` (or returns a
    replacement value) — used for rules a type cannot express, like "a parseable time".
    """

    def __init__(self, inner: Schema, check: Callable[[Any], Any]) -> None:
        self.inner = inner
        self.check = check

    def validate(self, value: Any, path: Sequence[PathItem] = ()) -> Any:
        value = self.inner.validate(value, path)
        try:
            return self.check(value)
        except FormError as e:
            raise FormError(e.message, (*path, *e.path)) from None
        except ValueError as e:
            raise FormError(str(e), path) from None
