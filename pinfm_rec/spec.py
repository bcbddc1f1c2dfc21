"""YAML ⇄ dataclasses: strict validation and dotted ``key=value`` overrides.

A spec is a tree of dataclasses. Each section is owned by the component that consumes it (the
data layer owns ``DataSpec``, the model owns ``ModelSpec``, ...); this module only knows how to
turn YAML into such a tree and back:

* unknown keys are errors naming the dotted key and the keys that would be valid;
* values are type-checked against the field annotation (int, float, str, bool, lists, nested
  dataclasses, ``Optional``); an int (or a YAML string like ``3e-4``) is accepted where a float is
  expected, nothing else is coerced;
* choice fields are ``Literal[...]``: a value outside the choices is an error listing them;
* numeric fields declare their valid range next to the field, ``field(default=10,
  metadata=bounds(ge=1))`` (lists are checked element by element), checked at load;
* a section's ``__post_init__`` may raise ``FieldError(field, message)`` for a rule over several of
  its own fields: the error names the dotted key;
* ``load_spec`` then runs ``cross_check`` (pinfm_rec/spec_checks.py), the one place for rules
  across sections (data vs trunk max_len, output head vs dims, encoder vs ranking data, ...);
* overrides ``a.b.c=value`` are parsed as YAML scalars/lists (``x=1e-3``, ``x=[1,2]``, ``x=true``);
* ``dump_spec`` writes the resolved spec back to YAML (saved beside every checkpoint).

Every failure is a ``SpecError`` naming the file and the dotted key, raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Type, TypeVar, Union

import yaml

T = TypeVar("T")


from pinfm_rec.errors import SpecError  # noqa: E402  (re-exported: pinfm_rec.spec.SpecError)

_BOUND_OPS = {
    "gt": (lambda v, b: v > b, "> {}"),
    "ge": (lambda v, b: v >= b, ">= {}"),
    "lt": (lambda v, b: v < b, "< {}"),
    "le": (lambda v, b: v <= b, "<= {}"),
}


def bounds(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None) -> dict:
    """Field metadata: the valid range of a numeric spec value (or of each element of a list),
    checked at load. ``dropout: float = field(default=0.1, metadata=bounds(ge=0, lt=1))``."""
    given = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    return {"bounds": {k: v for k, v in given.items() if v is not None}}


class FieldError(ValueError):
    """Raised by a spec section's ``__post_init__`` when ``field`` (a name of that section) is
    inconsistent with the section's other fields; loading reports it under the dotted key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check_bounds(value: Any, rule: dict, key: str, where: str) -> None:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_bounds(v, rule, f"{key}[{i}]", where)
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not all(_BOUND_OPS[op][0](value, b) for op, b in rule.items()):
        want = " and ".join(_BOUND_OPS[op][1].format(b) for op, b in rule.items())
        raise SpecError(f"{where}: key '{key}' must be {want}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or (types.UnionType is not None and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(f"{where}: key '{key}': {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SpecError(f"{where}: key '{key}' must be a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: key '{key}' must be a list, got {value!r}")
        elem = args[0] if args else Any
        return [_convert(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{key}.{k}", where) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise SpecError(f"{where}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: key '{key}' must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: key '{key}' must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: key '{key}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise SpecError(f"{where}: key '{key}': unsupported type {_type_name(tp)} for {value!r}")


def _build(cls: Type[T], data: dict, prefix: str, where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise SpecError(
                f"{where}: unknown key '{dotted}' (valid keys of {cls.__name__}: {', '.join(sorted(names))})"
            )
        kwargs[k] = _convert(v, hints[k], dotted, where)
    for f in dataclasses.fields(cls):  # ranges first: __post_init__ may divide by a field
        if f.name in kwargs and "bounds" in f.metadata:
            _check_bounds(kwargs[f.name], f.metadata["bounds"], f"{prefix}.{f.name}" if prefix else f.name, where)
    try:
        obj = cls(**kwargs)
    except FieldError as e:
        dotted = f"{prefix}.{e.field}" if prefix else e.field
        raise SpecError(f"{where}: key '{dotted}': {e.message}") from e
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: section '{prefix or cls.__name__}': {e}") from e
    return obj


def from_dict(cls: Type[T], data: dict | None, where: str = "<spec>") -> T:
    """Validate a nested mapping into the dataclass tree rooted at ``cls``."""
    return _build(cls, dict(data or {}), "", where)


def to_dict(spec: Any) -> dict:
    """The spec tree as plain Python containers (YAML-serialisable)."""
    return dataclasses.asdict(spec)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=1e-3'`` → (['a', 'b'], 0.001). Values are parsed as YAML."""
    if "=" not in text:
        raise SpecError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise SpecError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise SpecError(f"override '{text}': cannot parse value: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Set dotted keys in a nested mapping (creating sections); validation happens in from_dict."""
    data = dict(data or {})
    for ov in overrides:
        path, value = parse_override(ov)
        node = data
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise SpecError(f"override '{ov}': '{p}' is not a section")
            else:
                nxt = dict(nxt)
            node[p] = nxt
            node = nxt
        node[path[-1]] = value
    return data


def load_spec(cls: Type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
              saved: bool = False) -> T:
    """Read YAML at ``path`` (or start from defaults), apply dotted overrides, validate into ``cls``
    and check the sections against each other (``spec_checks.cross_check``). ``saved``: ``path`` is
    a run's resolved spec.yaml, read with the defaults of the code that wrote it for keys added
    since (``model.managed.legacy_spec_defaults``).

    Raises SpecError naming the file and the dotted key on any unknown/mistyped/out-of-range key.
    """
    where = str(path) if path else "<defaults>"
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"spec file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SpecError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise SpecError(f"{p}: top level must be a mapping, got {type(data).__name__}")
        if saved and isinstance(data.get("model"), dict):
            from pinfm_rec.model.managed import legacy_spec_defaults

            data["model"] = legacy_spec_defaults(data["model"])
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        where = f"{where} + overrides {overrides}"
    from pinfm_rec.spec_checks import cross_check  # rules over the whole tree, duck-typed

    spec = from_dict(cls, data, where)
    cross_check(spec, where)
    return spec


def dump_spec(spec: Any, path: str | Path | None = None) -> str:
    """Resolved spec as YAML text; also written to ``path`` when given."""
    text = yaml.safe_dump(to_dict(spec), sort_keys=False)
    if path:
        Path(path).write_text(text)
    return text
