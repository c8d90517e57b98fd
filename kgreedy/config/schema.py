"""Strict JSON into frozen dataclasses: the machinery under every recipe schema.

A schema is a tree of frozen, keyword-only dataclasses whose fields are declared with
`setting(default, choices=..., low=..., doc=...)`. `build` converts a parsed JSON object
into it: an unknown key, a wrong type or a value out of range raises `RecipeError`
naming the JSON path (`model.blocks[2].downsample`) and the value received. A number
must be finite (NaN passes every comparison, so a range alone would let it through),
and a name pattern must match the whole string.
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import field

from kgreedy.base.errors import RecipeError


def setting(default=dataclasses.MISSING, *, choices=None, low=None, high=None,
         open_low=False, open_high=False, pattern=None, words=None, doc=""):
    """Declares a recipe key with its default and allowed values.

    `words` are the strings a number-or-string key accepts (`aux.width: "auto"`);
    `choices`, `low` and `high` then apply to its numbers.
    """
    meta = dict(choices=choices, low=low, high=high, open_low=open_low,
                open_high=open_high, pattern=pattern, words=words, doc=doc)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def to_plain(value):
    """`value` as it reads back from JSON: tuples become lists, recursively."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def join(path, key):
    return f"{path}.{key}" if path else str(key)


def _type_name(tp):
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number",
                "bool": "true or false"}.get(tp.__name__, f"an object ({tp.__name__})")
    return str(tp)


def convert(tp, value, path):
    """Converts a JSON value to the declared type `tp`, or raises RecipeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:
            try:
                return convert(arg, value, path)
            except RecipeError:
                pass  # not this member of the union: try the next
        try:
            return convert(args[-1], value, path)
        except RecipeError:
            if len(args) == 1:
                raise
            raise RecipeError(path, "expected " + " or ".join(map(_type_name, args)),
                              value) from None
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise RecipeError(path, "expected a list", value)
        return tuple(convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(path, "expected an object", value)
        return build(tp, value, path)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an int beyond float's range
                raise RecipeError(path, "must be a finite number",
                                  shown(value)) from None
            if not math.isfinite(value):
                raise RecipeError(path, "must be a finite number", value)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise RecipeError(path, f"expected {_type_name(tp)}", shown(value))
    return value


def shown(value):
    """`value` as a message may show it: an int of thousands of digits cannot even be
    printed (Python's digit limit), so it is named by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return value


def _check_range(meta, value, path):
    if value is None:
        return
    if meta.get("words") is not None and isinstance(value, str):
        if value not in meta["words"]:
            raise RecipeError(path, "must be a number or one of "
                              + ", ".join(repr(w) for w in meta["words"]), value)
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise RecipeError(path, f"must be one of {allowed}", shown(value))
    low, high = meta.get("low"), meta.get("high")
    # Written as "not within" so that a NaN (false in every comparison) fails them.
    if low is not None and not (value > low if meta["open_low"] else value >= low):
        raise RecipeError(path, f"must be {'>' if meta['open_low'] else '>='} {low}",
                          shown(value))
    if high is not None and not (value < high if meta["open_high"] else value <= high):
        raise RecipeError(path, f"must be {'<' if meta['open_high'] else '<='} {high}",
                          shown(value))
    # fullmatch: `$` also matches before a trailing newline, and `name: "nl\n"`
    # trained three stages into `runs/nl\n` before its export failed.
    if meta.get("pattern") is not None and not meta["pattern"].fullmatch(value):
        raise RecipeError(path, "must be letters, digits, '_', '.' or '-' "
                          "and start with a letter or digit", value)


def build(cls, raw, path):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise RecipeError(join(path, key), "unknown key; known keys are "
                              + ", ".join(known), raw[key])
    kwargs = {}
    for name, f in known.items():
        key_path = join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(key_path, "is required")
            continue
        value = convert(hints[name], raw[name], key_path)
        _check_range(f.metadata, value, key_path)
        kwargs[name] = value
    return cls(**kwargs)


def describe_keys(cls, prefix=""):
    """Yields (path, type, default, doc) for every key of schema `cls`, for the
    reference table of docs/recipes.md."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            yield from describe_keys(tp, path)
            continue
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):  # an optional object
            yield (path, "object or null", json.dumps(f.default), f.metadata.get("doc", ""))
            yield from describe_keys(inner[0], path)
            continue
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            default = ("required" if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING else "[]")
            yield (path, "list of objects", default, f.metadata.get("doc", ""))
            yield from describe_keys(typing.get_args(tp)[0], path + "[]")
            continue
        default = "required" if f.default is dataclasses.MISSING else json.dumps(f.default)
        choices = f.metadata.get("choices")
        doc = f.metadata.get("doc", "")
        if choices:
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, choices))
        if f.metadata.get("words"):
            doc = (doc + "; " if doc else "") + "or " + ", ".join(f.metadata["words"])
        yield (path, _json_type(tp), default, doc)


def _json_type(tp):
    """A type as a JSON user reads it: `integer or null`, `list of numbers`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_json_type(a) for a in args)
        return f"{names} or null" if type(None) in typing.get_args(tp) else names
    if origin is tuple:
        item = _json_type(typing.get_args(tp)[0])
        return "list of " + {"integer": "integers", "number": "numbers",
                             "string": "strings"}.get(item, item)
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))
