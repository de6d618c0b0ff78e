"""Config fields that are also command-line options: each default and help text is declared once, on the field.

`option(default, help, ...)` is a dataclass field whose metadata the command line reads: the option's name when it
differs from the field's (--layers for n_layers), its choices, its flag names when a switch has a name of its own
(--symmetric/--one-way), and what its help shows as the default when that is not the value itself (a default
resolved at run time, "the context"). `option_fields(cls)` lists them by option name; `mixret.cli` turns each into a
click option, so a config's defaults and help texts are the command's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field

from mixret import io
from mixret.errors import MixretError


def option(default=dataclasses.MISSING, help: str = "", *, name: str | None = None, choices=None,
           switch: str | None = None, show: str | None = None, factory=None, arch: str | None = None,
           derived: bool = False, cli: bool = True, split: str | None = None):
    """A config field with its help text.

    name: the option's name when it is not the field's; choices: the values allowed; switch: "--on/--off" flag
    names of a boolean; show: the default as the help shows it (when None or resolved later); factory: a default
    factory (lists, nested configs); arch: the only architecture the field applies to; derived: set by mixret,
    never by the user; cli: False for a field that the command line does not offer (set from Python or a
    config file only); split: a list given as one string, split at this separator ("none" for an empty list)."""
    meta = {"help": help, "option": name, "choices": tuple(choices) if choices else None, "switch": switch,
            "show": show, "arch": arch, "derived": derived, "cli": cli, "split": split}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def option_name(f: dataclasses.Field) -> str:
    return f.metadata.get("option") or f.name


def option_fields(cls) -> dict[str, dataclasses.Field]:
    """Option name -> field, for every field of a config dataclass that a user sets (not derived ones)."""
    return {option_name(f): f for f in dataclasses.fields(cls)
            if not f.metadata.get("derived") and not f.metadata.get("nested")}


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def all_options(cls) -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Option name -> (the nested field holding it, or None; its field), over cls and its nested configs, minus
    each nested config's `exclude`d options."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            for inner_name, inner_field in option_fields(type(field_default(f))).items():
                if inner_name not in f.metadata.get("exclude", ()):
                    out[inner_name] = (f.name, inner_field)
        elif not f.metadata.get("derived"):
            out[option_name(f)] = (None, f)
    return out


def nested(factory, help: str = "", exclude: tuple[str, ...] = (), show: dict | None = None):
    """A field holding a config of its own (built by factory); its options join the parent's, but `exclude`;
    show: {option: the default as the parent's help shows it} where the parent resolves it later."""
    return field(default_factory=factory, metadata={"help": help, "option": None, "nested": True,
                                                    "exclude": tuple(exclude), "cli": True, "derived": False,
                                                    "show": dict(show or {})})


def replace_options(cfg, options: dict, source: str = "options"):
    """A copy of the config `cfg` with `options` (option names, nested ones included) set; unknown names refused,
    naming source."""
    known = all_options(type(cfg))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MixretError(f"{source}: unknown option(s) {', '.join(unknown)}; expected some of "
                          f"{', '.join(sorted(known))}")
    top, inner = {}, {}
    for name, value in options.items():
        holder, f = known[name]
        (inner.setdefault(holder, {}) if holder else top)[f.name] = value
    for holder, values in inner.items():
        top[holder] = dataclasses.replace(getattr(cfg, holder), **values)
    return dataclasses.replace(cfg, **top)


def flat_options(cfg) -> dict:
    """Option name -> value of a config, nested configs' options beside the others."""
    return {name: getattr(getattr(cfg, holder) if holder else cfg, f.name)
            for name, (holder, f) in all_options(type(cfg)).items()}


def read_options_file(path) -> dict:
    """A JSON file of options by name (dashes or underscores) -> {name: value}."""
    options = io.read_json(path, "config file")
    if not isinstance(options, dict):
        raise MixretError(f"{path}: expected a JSON object of options")
    return {k.replace("-", "_"): v for k, v in options.items()}
