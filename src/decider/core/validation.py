"""Configuration tables validated by pydantic (strict mode: no coercion, unknown keys refused),
behind one formatter that words every problem the same way: the key path, the bad value and what
is allowed, e.g. `routing.least_request.choice_count: 1, must be an int >= 2`.

A table's value class is a plain frozen dataclass whose fields carry their limits
(`field(default=2, metadata=allowed(ge=2))`); `Tables` derives one strict pydantic model per class
from those fields, validates a TOML table with it and collects the problems. Problems are kept
with their position in the document, so `ConfigErrors` lists every problem of a file, in file
order, not just the first.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from decider.errors import ConfigError

T = TypeVar("T")

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Allowed:
    """What a key accepts beyond its type: bounds, choices, and how to say it."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    # inf and nan refused (nan always is: it fails every bound).
    finite: bool = False
    choices: tuple[str, ...] = ()
    # Choices match in any case and are kept as spelled in `choices` ("info" -> "INFO").
    any_case: bool = False
    # Overrides the generated description of what is allowed.
    what: str = ""
    # A secret (a token, header values): messages name the key but never quote the value.
    secret: bool = False


def allowed(**limits: Any) -> dict[str, Allowed]:
    """Dataclass field metadata: `field(default=2, metadata=allowed(ge=2))`."""
    return {"allowed": Allowed(**limits)}


def _num(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def describe(kind: Any, spec: Allowed) -> str:
    """What a key of this type and these limits accepts, in words."""
    if spec.what:
        return spec.what
    if spec.choices:
        return f"one of {', '.join(spec.choices)}"
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    if kind is int:
        if spec.ge is not None and spec.le is not None:
            return f"an integer from {_num(spec.ge)} to {_num(spec.le)}"
        if spec.ge is not None:
            return f"an int >= {_num(spec.ge)}"
        return "an integer"
    if kind is float:
        if spec.ge is not None and spec.le is not None:
            return f"a number from {_num(spec.ge)} to {_num(spec.le)}"
        if spec.ge is not None and spec.lt is not None:
            return f"a number >= {_num(spec.ge)} and < {_num(spec.lt)}"
        if spec.gt is not None:
            return f"a number > {_num(spec.gt)}"
        if spec.ge is not None:
            return f"a number >= {_num(spec.ge)}"
        return "a number"
    return "a table"


# What an error inside a key's value asks for, by pydantic error type.
_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "dict_type": "a table",
    "list_type": "an array",
}


def show(value: Any) -> str:
    """A value as messages quote it: its repr, cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """One problem of a document: `order` is its position (indexes of the keys on its path in
    file order), `text` the message without the file name."""

    order: tuple[int, ...]
    text: str


class ConfigErrors(ConfigError):
    """Every problem found in a document, one per line, in file order."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(sorted(problems))
        super().__init__("\n".join(p.text for p in self.problems))

    def prefixed(self, source: str) -> ConfigErrors:
        """The same problems, each line starting with the file name."""
        return ConfigErrors([Problem(p.order, f"{source}: {p.text}") for p in self.problems])


class Problems:
    """Collects problems while a document is validated; `raise_any` raises them all at once."""

    def __init__(self) -> None:
        self._items: list[Problem] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, order: tuple[int, ...], text: str) -> None:
        self._items.append(Problem(order, text))

    def extend(self, exc: ConfigError, order: tuple[int, ...]) -> None:
        """Problems raised by a nested parser, placed at `order` in this document."""
        if isinstance(exc, ConfigErrors):
            for p in exc.problems:
                self._items.append(Problem(order + p.order, p.text))
        else:
            self._items.append(Problem(order, str(exc)))

    def raise_any(self) -> None:
        if self._items:
            raise ConfigErrors(self._items)


def position(table: Any, key: str | int) -> int:
    """Where `key` is in `table` (file order); past the end when it is not there."""
    if isinstance(table, Mapping):
        for i, k in enumerate(table):
            if k == key:
                return i
        return len(table)
    return key if isinstance(key, int) else 0


def from_text(raw: str, kind: Any) -> Any:
    """An environment variable's text as the key's type, when it reads as one (else the text,
    which the check then refuses)."""
    if kind is bool:
        return {"true": True, "1": True, "false": False, "0": False}.get(raw.strip().lower(), raw)
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        pass
    return raw


class _Spec:
    __slots__ = ("allowed", "default", "kind", "name")

    def __init__(self, name: str, kind: Any, spec: Allowed, default: Any) -> None:
        self.name = name
        self.kind = kind
        self.allowed = spec
        self.default = default


def _choice_checker(spec: Allowed) -> Callable[[str], str]:
    def check(value: str) -> str:
        for choice in spec.choices:
            if choice == value or (spec.any_case and choice.lower() == value.lower()):
                return choice
        raise PydanticCustomError("choice", "not a choice")

    return check


class Schema:
    """The strict pydantic model of one dataclass, and its fields' limits for the formatter."""

    def __init__(self, cls: type, *, exclude: Iterable[str] = ()) -> None:
        hints = typing.get_type_hints(cls, include_extras=False)
        skip = set(exclude)
        self.specs: dict[str, _Spec] = {}
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            kind = hints[f.name]
            spec: Allowed = f.metadata.get("allowed", Allowed())
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            self.specs[f.name] = _Spec(f.name, kind, spec, default)
            field_info = Field(
                default=... if default is dataclasses.MISSING else default,
                ge=spec.ge,
                gt=spec.gt,
                le=spec.le,
                lt=spec.lt,
                allow_inf_nan=None if not spec.finite else False,
            )
            annotated: Any = kind
            if spec.choices:
                annotated = Annotated[kind, AfterValidator(_choice_checker(spec))]
            fields[f.name] = (annotated, field_info)
        self.model: type[BaseModel] = create_model(
            f"{cls.__name__}Table", __config__=_STRICT, **fields
        )

    def validate(
        self,
        table: Any,
        path: str,
        problems: Problems,
        order: tuple[int, ...] = (),
        *,
        skip: Iterable[str] = (),
        suffix: str = "",
        failed: set[str] | None = None,
    ) -> dict[str, Any] | None:
        """The table's values by field name, or None (its problems added) when it is invalid.
        Keys in `skip` are the caller's to check (and count as known); `suffix` ends every
        message (an endpoint's id, say). Given a
        `failed` set, an invalid table still gives its valid keys' values (defaults for the bad
        ones) and the bad keys go into `failed`, so the caller can go on checking the rest."""
        if not isinstance(table, Mapping):
            problems.add(order, f"{path}: {show(table)}, must be a table{suffix}")
            return None
        skipped = frozenset(skip)
        try:
            model = self.model.model_validate(
                {k: v for k, v in table.items() if k not in skipped} if skipped else dict(table)
            )
        except ValidationError as exc:
            seen: set[str] = failed if failed is not None else set()
            for error in exc.errors():
                loc = error["loc"]
                key = str(loc[0]) if loc else ""
                if key in seen:
                    continue
                seen.add(key)
                where = (*order, position(table, key)) if key else order
                problems.add(where, self._text(error, table, path, key, skipped) + suffix)
            if failed is None:
                return None
            try:
                model = self.model.model_validate(
                    {k: v for k, v in table.items() if k not in seen and k not in skipped}
                )
            except ValidationError:
                return None
        return {name: getattr(model, name) for name in self.specs}

    def check_value(
        self,
        key: str,
        value: Any,
        where: str,
        problems: Problems,
        order: tuple[int, ...],
        *,
        shown: str = "",
    ) -> Any:
        """One key's value set outside a table (an environment variable, a flag): the checked
        value, or dataclasses.MISSING with a problem worded `where: shown, must be ...`."""
        spec = self.specs[key]
        try:
            model = self.model.model_validate({key: value})
        except ValidationError:
            text = "" if spec.allowed.secret else f"{shown or show(value)}, "
            problems.add(order, f"{where}: {text}must be {describe(spec.kind, spec.allowed)}")
            return dataclasses.MISSING
        return getattr(model, key)

    def _text(
        self,
        error: Any,
        table: Mapping[str, Any],
        path: str,
        key: str,
        known: Iterable[str],
    ) -> str:
        if error["type"] == "extra_forbidden":
            names = ", ".join(sorted({*self.specs, *known})) or "none"
            return f"{path}.{key}: unknown key (known: {names})"
        spec = self.specs.get(key)
        if spec is None:
            return f"{path}: {error['msg']}"
        loc = error["loc"]
        if len(loc) > 1 and not spec.allowed.what:
            # Inside a key's value (a label's value, say): name the inner key.
            inner = ".".join(str(part) for part in loc)
            words = _TYPE_WORDS.get(error["type"], error["msg"])
            return f"{path}.{inner}: {_quoted(error['input'], spec)}must be {words}"
        if error["type"] == "missing":
            return f"{path}.{key}: missing, must be {describe(spec.kind, spec.allowed)}"
        value = table.get(key, spec.default)
        return f"{path}.{key}: {_quoted(value, spec)}must be {describe(spec.kind, spec.allowed)}"


def _quoted(value: Any, spec: _Spec) -> str:
    """The bad value and a comma, as a message quotes it; nothing for a secret."""
    return "" if spec.allowed.secret else f"{show(value)}, "


_SCHEMAS: dict[tuple[type, frozenset[str]], Schema] = {}


def schema(cls: type, *, exclude: Iterable[str] = ()) -> Schema:
    """The Schema of a dataclass (built once)."""
    key = (cls, frozenset(exclude))
    found = _SCHEMAS.get(key)
    if found is None:
        found = _SCHEMAS[key] = Schema(cls, exclude=exclude)
    return found


def parse_table(cls: Callable[..., T], table: Any, path: str, *, check: bool = True) -> T:
    """The dataclass `cls` from a TOML table, or ConfigErrors with every problem of it."""
    problems = Problems()
    values = schema(typing.cast(type, cls)).validate(table, path, problems)
    problems.raise_any()
    assert values is not None
    return cls(**values)
