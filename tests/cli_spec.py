"""Read every sub-command's flags from the argparse parser as plain data (for the flags-unchanged test)."""

from __future__ import annotations

import argparse


def _type_name(t) -> str | None:
    if t is None:
        return None
    return getattr(t, "__name__", type(t).__name__)


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def _name(a: argparse.Action) -> str:
    """A flag's long name (``--calib-resample`` for a ``--calib-resample/--no-calib-resample`` pair)."""
    return next((o for o in a.option_strings if o.startswith("--")), a.dest)


def command_spec(parser: argparse.ArgumentParser) -> dict:
    """{command: {"flags": {flag: fields}, "exclusive": [[flags...], ...]}} of a parser with sub-commands."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        flags = {}
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            key = _name(a)
            flags[key] = {
                "option_strings": list(a.option_strings),
                "dest": a.dest,
                "default": _jsonable(a.default),
                "choices": _jsonable(list(a.choices)) if a.choices is not None else None,
                "required": a.required,
                "nargs": _jsonable(a.nargs),
                "const": _jsonable(a.const),
                "type": _type_name(a.type),
                "metavar": _jsonable(a.metavar),
                "action": type(a).__name__,
                "help": a.help,
            }
        groups = [sorted(_name(x) for x in g._group_actions) for g in p._mutually_exclusive_groups]
        out[name] = {"flags": flags, "exclusive": sorted(groups),
                     "exclusive_required": sorted(sorted(_name(x) for x in g._group_actions)
                                                  for g in p._mutually_exclusive_groups if g.required)}
    return out
