"""`--set KEY=VALUE` overrides of a raw (JSON) recipe, before validation."""

import json

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import MAX_JSON_DEPTH, JsonRefused, loads


def parse_override(text):
    """Splits `KEY=VALUE`; the value is parsed as strict JSON
    (`kgreedy.base.files.loads`), else taken as a string.

    JSON that the strict reader refuses (`NaN`, `Infinity`, `1e400`, an integer of
    hundreds of digits, a key twice) is an error, not a string: it was meant as a
    number, and as a string it would reach a number key as a confusing type error,
    or a string key unnoticed. Quoted (`name="NaN"`) it is a string.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KgreedyError("overrides", "expected KEY=VALUE with a dotted KEY", text)
    if key.count(".") >= MAX_JSON_DEPTH:
        raise KgreedyError("overrides", f"KEY is nested deeper than {MAX_JSON_DEPTH} "
                           "levels", text[:40] + "...")
    try:
        value = loads(value)
    except json.JSONDecodeError:
        pass
    except JsonRefused as e:
        where = key + ("." + e.path if e.path[:1] not in ("", "[") else e.path)
        raise KgreedyError("overrides", f"{where}: {e.problem}", e.received) from None
    return key, value


def apply_overrides(raw, overrides):
    """Returns a copy of `raw` with each `KEY=VALUE` in `overrides` applied.

    KEY is a dotted path; list items are addressed by index (`model.blocks.0.width`).
    Missing objects along the path are created, so a key the recipe left at its
    default can be set; unknown keys are caught by validation afterwards.
    """
    raw = json.loads(json.dumps(raw))
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise KgreedyError("overrides", f"{where}: no list item {part!r} "
                                       f"(the list has {len(node)} items)", text)
                part = int(part)
            elif not isinstance(node, dict):
                raise KgreedyError("overrides", f"{where}: cannot descend into a "
                                   f"{type(node).__name__}", text)
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return raw
