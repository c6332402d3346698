"""Python values <-> D-Bus variants for the job views: ``a{sv}`` dictionaries, typed arrays where the
items allow, and ``null_keys`` (``aas``) listing where the view held None, which D-Bus cannot carry."""

from __future__ import annotations


def to_variant(value):
    from gi.repository import GLib  # noqa: PLC0415

    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        return GLib.Variant("x", value) if -(1 << 63) <= value < (1 << 63) else GLib.Variant("s", str(value))
    if isinstance(value, float):
        return GLib.Variant("d", value)
    if isinstance(value, str):
        return GLib.Variant("s", value)
    if isinstance(value, dict):
        return GLib.Variant("a{sv}", to_vardict(value))
    if isinstance(value, (list, tuple)):
        items = [v for v in value if v is not None]
        for kind, sig in ((bool, "ab"), (int, "ax"), (float, "ad"), (str, "as")):
            if items and all(type(v) is kind for v in items):
                return GLib.Variant(sig, items)
        if items and all(isinstance(v, dict) for v in items):
            return GLib.Variant("aa{sv}", [to_vardict(v) for v in items])
        return GLib.Variant("av", [to_variant(v) for v in items])
    return GLib.Variant("s", str(value))


def to_vardict(mapping: dict) -> dict:
    return {str(k): to_variant(v) for k, v in mapping.items() if v is not None}


NULLS_KEY = "null_keys"


def null_paths(value, path: tuple = ()) -> list[list[str]]:
    """Where ``value`` holds None (D-Bus cannot carry it): key paths, list indexes as digits."""
    if value is None:
        return [list(path)]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in null_paths(v, (*path, str(k)))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) if v is None or isinstance(v, (dict, list, tuple))
                for p in null_paths(v, (*path, str(i)))]
    return []


def view_to_vardict(view: dict) -> dict:
    """A job view as ``a{sv}``: None values left out, their key paths listed under ``null_keys``
    (``aas``) so that a client can rebuild the exact view."""
    result = to_vardict(view)
    nulls = null_paths(view)
    if nulls:
        from gi.repository import GLib  # noqa: PLC0415

        result[NULLS_KEY] = GLib.Variant("aas", nulls)
    return result


def view_from_dict(data: dict) -> dict:
    """The inverse of ``view_to_vardict`` on the unpacked dictionary."""
    view = dict(data)
    for path in view.pop(NULLS_KEY, []):
        target = view
        try:
            for key in path[:-1]:
                target = target[int(key)] if isinstance(target, list) else target[key]
            if isinstance(target, list):
                target.insert(int(path[-1]), None)
            else:
                target[path[-1]] = None
        except (KeyError, IndexError, ValueError, TypeError):
            continue
    return view
