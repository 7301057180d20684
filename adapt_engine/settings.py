"""Every command-line setting declared once: dataclass fields carrying their flag, help, choices and bounds.

A setting is a dataclass field made with :func:`setting`. Its metadata says how the flag looks (help,
choices, metavar, a custom argparse type), which values are valid (``minimum``/``above``/``maximum``/
``below``), whether it belongs to a required either-or group (``group``), and whether it changes the
result of a run (``math``: these fields must match when ``accel --resume`` continues a checkpoint).
A field whose type is itself a settings dataclass nests that dataclass: its flags become the command's
flags (``exclude`` drops some of them), and its default instance gives the command's defaults.

:func:`add_flags` turns a settings class into argparse flags, :func:`from_args` turns the parsed
namespace back into the dataclass, :func:`check_bounds` validates the declared bounds and choices (each
class's ``validate`` adds the checks between fields), and :func:`math_fingerprint` lists the fields that
must not change across a resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from .errors import UsageError

_KEY = "adapt_engine.setting"


@dataclass(frozen=True)
class Spec:
    """How one setting appears on the command line and which values it accepts."""

    help: str
    choices: tuple | None = None
    math: bool = True
    flag: str | None = None
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    below: float | None = None
    group: str | None = None
    metavar: str | None = None
    type: Callable | None = None
    nargs: str | None = None
    required: bool = False
    exclude: tuple[str, ...] = ()


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, **spec) -> Any:
    """A dataclass field declaring one setting (see :class:`Spec` for the keywords)."""
    meta = {_KEY: Spec(**spec)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def nested(factory: Callable[[], Any], *, exclude: tuple[str, ...] = (), help: str = "") -> Any:
    """A field holding another settings dataclass; ``exclude`` names its fields that are no flags here."""
    return field(default_factory=factory, metadata={_KEY: Spec(help=help, exclude=exclude)})


def spec_of(f: dataclasses.Field) -> Spec:
    """The :class:`Spec` of a field (a field made without :func:`setting` has none: a bug)."""
    try:
        return f.metadata[_KEY]
    except KeyError:
        raise TypeError(f"settings field '{f.name}' was not declared with setting()") from None


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _nested_class(cls, f: dataclasses.Field):
    hint = _hints(cls)[f.name]
    return hint if isinstance(hint, type) and is_dataclass(hint) else None


def _default_instance(cls, f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass(frozen=True)
class Leaf:
    """One flag: the dataclass path to its value, its field, spec, value type and default."""

    path: tuple[str, ...]
    field: dataclasses.Field
    spec: Spec
    kind: type
    default: Any

    @property
    def name(self) -> str:
        """The argparse dest (the field's name)."""
        return self.path[-1]

    @property
    def flag(self) -> str:
        """The command-line spelling, e.g. ``--calib-batch-size``."""
        return self.spec.flag or "--" + self.name.replace("_", "-")


def _scalar_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def leaves(cls, defaults: Any = None, path: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every flag-bearing field of ``cls``, nested settings flattened, in declaration order."""
    hints = _hints(cls)
    for f in fields(cls):
        if f.name in exclude or _KEY not in f.metadata:
            continue
        spec = spec_of(f)
        default = getattr(defaults, f.name) if defaults is not None else _default_instance(cls, f)
        sub = _nested_class(cls, f)
        if sub is not None:
            yield from leaves(sub, default, (*path, f.name), spec.exclude)
            continue
        yield Leaf((*path, f.name), f, spec, _scalar_type(hints[f.name]), default)


def _argparse_kwargs(leaf: Leaf) -> dict:
    spec = leaf.spec
    if leaf.kind is bool:
        if leaf.default is None:  # three states: --flag, --no-flag, or neither (the setting then decides)
            return {"action": argparse.BooleanOptionalAction, "default": None, "help": spec.help}
        return {"action": "store_true", "help": spec.help}
    kw: dict[str, Any] = {"help": spec.help}
    if leaf.default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = leaf.default
    if spec.type is not None:
        kw["type"] = spec.type
    elif leaf.kind in (int, float):
        kw["type"] = leaf.kind
    for key in ("choices", "metavar", "nargs"):
        if getattr(spec, key) is not None:
            kw[key] = getattr(spec, key)
    if spec.required:
        kw["required"] = True
    return kw


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Add a flag for every setting of ``cls`` (nested settings included) to ``parser``."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    seen: set[str] = set()
    for leaf in leaves(cls):
        if leaf.name in seen:
            raise TypeError(f"setting '{leaf.name}' is declared twice in {cls.__name__}")
        seen.add(leaf.name)
        kw = _argparse_kwargs(leaf)
        target = parser
        if leaf.spec.group is not None:
            target = groups.get(leaf.spec.group)
            if target is None:
                target = groups[leaf.spec.group] = parser.add_mutually_exclusive_group(required=True)
            kw.pop("default", None)
        target.add_argument(leaf.flag, dest=leaf.name, **kw)


def from_args(cls, args: argparse.Namespace | dict):
    """The settings dataclass ``cls`` from parsed flags (fields without a flag keep their defaults)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = flat_names(cls)
    return from_flat(cls, **{k: v for k, v in values.items() if k in names})


def _children(cls, exclude: tuple[str, ...] = ()) -> Iterator[tuple[dataclasses.Field, Any, tuple[str, ...]]]:
    """(field, nested settings class or None, the nested class's excluded names) of every field not excluded."""
    for f in fields(cls):
        if f.name in exclude:
            continue
        sub = _nested_class(cls, f)
        yield f, sub, (spec_of(f).exclude if sub is not None and _KEY in f.metadata else ())


@functools.cache
def flat_names(cls, exclude: tuple[str, ...] = ()) -> frozenset[str]:
    """Names of every settable field of ``cls`` and its nested settings (excluded fields left out)."""
    names: set[str] = set()
    for f, sub, sub_exclude in _children(cls, exclude):
        names |= flat_names(sub, sub_exclude) if sub is not None else {f.name}
    return frozenset(names)


def from_flat(cls, **values):
    """Build ``cls`` from flat field names, routing each to the nested settings that declares it."""
    kwargs = _pop_kwargs(cls, (), values)
    if values:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(values))}")
    return cls(**kwargs)


def _pop_kwargs(cls, exclude: tuple[str, ...], values: dict) -> dict:
    """Constructor keywords of ``cls`` taken (and removed) from ``values``; nested settings start from
    the default that ``cls`` gives them."""
    kwargs = {}
    for f, sub, sub_exclude in _children(cls, exclude):
        if sub is not None:
            inner = _pop_kwargs(sub, sub_exclude, values)
            if inner:
                kwargs[f.name] = dataclasses.replace(_default_instance(cls, f), **inner)
        elif f.name in values:
            kwargs[f.name] = values.pop(f.name)
    return kwargs


def _walk(obj, exclude: tuple[str, ...] = ()) -> Iterator[tuple[dataclasses.Field, Any]]:
    """(field, value) of every scalar setting of ``obj``, nested settings flattened, excluded ones left out."""
    for f, sub, sub_exclude in _children(type(obj), exclude):
        value = getattr(obj, f.name)
        if sub is not None:
            yield from _walk(value, sub_exclude)
        else:
            yield f, value


def flat_dict(obj) -> dict:
    """A settings instance as one flat ``{name: value}`` dict (the form reports and fingerprints use)."""
    return {f.name: value for f, value in _walk(obj)}


def math_fingerprint(obj) -> dict:
    """``{name: value}`` of every field marked ``math=True``: a resumed run must match all of them."""
    return {f.name: value for f, value in _walk(obj) if _KEY in f.metadata and spec_of(f).math}


def _bound_text(spec: Spec) -> str:
    lo = f"[{spec.minimum:g}" if spec.minimum is not None else (f"({spec.above:g}" if spec.above is not None else "")
    hi = f"{spec.maximum:g}]" if spec.maximum is not None else (f"{spec.below:g})" if spec.below is not None else "")
    if lo and hi:
        return f"in {lo}, {hi}"
    if spec.minimum is not None:
        return f"at least {spec.minimum:g}"
    if spec.above is not None:
        return f"greater than {spec.above:g}"
    if spec.maximum is not None:
        return f"at most {spec.maximum:g}"
    return f"less than {spec.below:g}"


def _in_bounds(value, spec: Spec) -> bool:
    return not any((
        spec.minimum is not None and value < spec.minimum,
        spec.above is not None and value <= spec.above,
        spec.maximum is not None and value > spec.maximum,
        spec.below is not None and value >= spec.below,
    ))


def check_bounds(obj) -> None:
    """Raise UsageError for a value outside its declared choices or bounds (nested settings included)."""
    for f, value in _walk(obj):
        if _KEY not in f.metadata or value is None:
            continue
        spec = spec_of(f)
        flag = spec.flag or "--" + f.name.replace("_", "-")
        if spec.choices is not None and spec.type is None and value not in spec.choices:
            raise UsageError(f"{flag} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
        bounded = any(b is not None for b in (spec.minimum, spec.above, spec.maximum, spec.below))
        if bounded and isinstance(value, (int, float)) and not _in_bounds(value, spec):
            raise UsageError(f"{flag} must be {_bound_text(spec)}, got {value}. {spec.help}")


class CommandSettings:
    """Base of a command's settings: nested groups readable by their flat names (``cfg.amplitude`` for
    ``cfg.prune.amplitude``), construction from flat names (``AccelConfig.from_flat(output=..., amplitude=0.03)``),
    nested groups given as dicts (from ``asdict`` or JSON) turned back into dataclasses, and validation group by
    group. Subclasses add checks between fields by extending :meth:`validate`."""

    @classmethod
    def from_flat(cls, **values):
        """Build from flat setting names (each routed to the nested settings that declares it)."""
        return from_flat(cls, **values)

    def __post_init__(self) -> None:
        for f, sub, _ in _children(type(self)):
            value = getattr(self, f.name)
            if sub is not None and isinstance(value, dict):
                setattr(self, f.name, sub(**value))

    def validate(self) -> None:
        """UsageError naming the flag for any value that cannot work: each nested group's own ``validate``,
        then every declared bound and choice."""
        for f, sub, _ in _children(type(self)):
            check = getattr(getattr(self, f.name), "validate", None) if sub is not None else None
            if check is not None:
                check()
        check_bounds(self)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for f, sub, sub_exclude in _children(type(self)):
            value = self.__dict__.get(f.name)
            if sub is not None and is_dataclass(value) and name in flat_names(sub, sub_exclude):
                return getattr(value, name)
        raise AttributeError(f"{type(self).__name__} has no setting '{name}'")


def int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of positive integers (``1,8``)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8, got '{text}'") from err
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8, got '{text}'")
    return values


def positive_int(text: str) -> int:
    """argparse type of one positive integer."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value
