"""The one `Registry` helper behind every kind of plug-in (dataset, model, criterion, augmentation).

Add an entry by decorating a class or factory in its own module; options of its own are
declared where it is registered, and become flags of train.py:

    from maskcls.registry import Registry
    MODELS = Registry("model")

    @MODELS.register("myNet", input_size=(224, 224), options={"my_width": "channels of the first block"})
    def my_net(num_classes, my_width=32, **kwargs):
        return MyNet(num_classes, my_width)

Then `python train.py --model myNet --my_width 64` builds it. An option's default and type come
from the entry's own signature (`my_width=32`: an int, 32 unless given), so the default lives in
one place; `Option(help, type=..., choices=...)` says more where needed. The run's config.json
records every option, and inference rebuilds the entry from it (`Registry.values_for`).

An unknown name is a `UserError` that lists the valid names and the closest match; a duplicate
name raises at import time.
"""
import argparse
import dataclasses
import difflib
import functools
import inspect

from maskcls.cli import UserError, WordsAction, str2bool


class UnknownName(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class Option:
    """A flag an entry declares. `default` and `type` default to the entry's keyword default and
    its type (bool defaults parse True/False/1/0/yes/no)."""
    help: str = ""
    type: object = None
    default: object = inspect.Parameter.empty
    choices: tuple = None
    metavar: str = None
    words: bool = False  # a list in one word (0.5,1) or several (0.5 1), as timm's nargs='+' flags


def _signature_default(obj, name):
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        parameter = inspect.signature(target).parameters.get(name)
    except (TypeError, ValueError):
        parameter = None
    return inspect.Parameter.empty if parameter is None else parameter.default


def _resolve_option(obj, key, name, spec):
    option = Option(help=spec) if isinstance(spec, str) else spec
    if not isinstance(option, Option):
        raise TypeError(f"option {name!r} of {key!r}: give a help text or an Option, not {type(spec).__name__}")
    default = option.default
    if default is inspect.Parameter.empty:
        default = _signature_default(obj, name)
    if default is inspect.Parameter.empty:
        raise TypeError(f"option {name!r} of {key!r} has no default: give the keyword a default in its "
                        f"signature, or Option(default=...)")
    kind = option.type or (str2bool if isinstance(default, bool) else type(default) if default is not None else str)
    return dataclasses.replace(option, default=default, type=kind)


def _reparse(option, name, value, source):
    """A value read from a file, checked by the option's own type and choices."""
    try:
        parsed = option.type(value if isinstance(value, str) else str(value))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        raise UserError(f"{source}: {name} is {value!r}: {err}") from None
    if option.choices is not None and parsed not in option.choices:
        raise UserError(f"{source}: {name} is {value!r}; expected one of {', '.join(map(str, option.choices))}")
    return parsed


class Registry:
    def __init__(self, kind, shared=None):
        """`shared`: {option: Option} every entry may take: passed to an entry whose signature names
        it (augmentation's --hflip, --scale, ...); its default (None) leaves the entry's own."""
        self.kind = kind
        self._entries = {}  # name -> (class or factory, metadata dict, {option name: Option})
        self.shared = dict(shared or {})

    def register(self, name=None, options=None, **meta):
        """Decorator: register a class or factory under `name` (default: its own name), with the
        flags it takes (`options`: {name: help text or Option}) and any metadata."""
        def add(obj):
            key = name or obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            if not (inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, functools.partial)):
                raise TypeError(f"register classes or factories, not instances: {key!r}")
            declared = {opt: _resolve_option(obj, key, opt, spec) for opt, spec in (options or {}).items()}
            self._entries[key] = (obj, dict(meta), declared)
            return obj
        return add

    def unregister(self, name):
        """Remove an entry (a test's or a notebook's temporary plug-in); an unknown name is one line."""
        del self._entries[self.canonical(name)]

    def names(self):
        return sorted(self._entries)

    def _find(self, name):
        """The registered name `name` means: itself, or the one entry it matches ignoring case
        (`adamw` is AdamW); None if none or several do."""
        if not isinstance(name, str):
            return None
        if name in self._entries:
            return name
        folded = [key for key in self._entries if key.lower() == name.lower()]
        return folded[0] if len(folded) == 1 else None

    def __contains__(self, name):
        return self._find(name) is not None

    def canonical(self, name):
        """The registered spelling of `name` (a callable passed in is returned unchanged)."""
        if callable(name):
            return name
        key = self._find(name)
        if key is None:
            raise self.unknown(name)
        return key

    def unknown(self, name, extra_choices=(), hint=""):
        """The error for an unknown name: sorted choices and the closest match (ignoring case)."""
        lowered = {}
        for choice in [*self._entries, *extra_choices]:
            lowered.setdefault(choice.lower(), choice)
        close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1)
        guess = f"; did you mean {lowered[close[0]]!r}?" if close else ""
        return UnknownName(f"unknown {self.kind} {name!r}{guess} valid names: "
                           f"{', '.join(self.names())}{hint}")

    def get(self, name):
        """The registered class or factory; a callable passed in is returned unchanged."""
        if callable(name):
            return name
        return self._entries[self.canonical(name)][0]

    def meta(self, name):
        """The metadata given at registration ({} for an object that was passed in)."""
        key = self._find(name)
        return dict(self._entries[key][1]) if key is not None else {}

    def options(self, name):
        """{option: Option} the entry takes: those it declared, and the shared ones its signature
        names (an object passed in takes only the shared ones it names)."""
        key = self._find(name)
        declared = dict(self._entries[key][2]) if key is not None else {}
        obj = self._entries[key][0] if key is not None else name
        if self.shared and callable(obj):
            target = obj.__init__ if inspect.isclass(obj) else obj
            try:
                parameters = inspect.signature(target).parameters
            except (TypeError, ValueError):
                parameters = {}
            declared.update({opt: option for opt, option in self.shared.items() if opt in parameters})
        return declared

    def values_for(self, name, values, source=None):
        """The entry's own options out of `values` (the parsed flags, or a run's config.json): a
        value missing there (a run from before the option existed) takes the declared default.
        `source` (a file's name): the values were read from that file, so each is parsed again by
        its option's type and choices, as the flag would be: a bad one is one line naming it."""
        out = {opt: values.get(opt, option.default) for opt, option in self.options(name).items()}
        if source is not None:
            for opt, option in self.options(name).items():
                if opt in values and values[opt] is not None:
                    out[opt] = _reparse(option, opt, values[opt], source)
        return out

    def all_options(self):
        """{option: (Option, [entries declaring it])} over every entry; entries that share an
        option must agree on its default and type."""
        merged = {opt: (option, []) for opt, option in self.shared.items()}
        for key in self.names():
            for opt, option in self.options(key).items():
                if opt in merged and (merged[opt][0].default, merged[opt][0].type) != (option.default, option.type):
                    raise ValueError(f"{self.kind} option {opt!r}: {key!r} declares default {option.default!r}, "
                                     f"{merged[opt][1][0]!r} {merged[opt][0].default!r}; one option, one default")
                merged.setdefault(opt, (option, []))[1].append(key)
        return merged

    def add_arguments(self, group):
        """Every declared option as a flag of an argparse group, its help naming the entries."""
        for opt, (option, users) in self.all_options().items():
            kwargs = dict(type=option.type, default=option.default, choices=option.choices,
                          metavar=option.metavar or ("BOOL" if option.type is str2bool else None),
                          help=f"{option.help} ({self.kind} {', '.join(users)})".strip())
            if option.type is str2bool:
                kwargs["nargs"], kwargs["const"] = "?", True
            if option.words:
                kwargs.update(action=WordsAction, parse=kwargs.pop("type"), nargs="+")
            try:
                group.add_argument(f"--{opt}", **kwargs)
            except Exception as err:  # argparse.ArgumentError: the name is taken by another flag
                raise ValueError(f"{self.kind} option --{opt} ({', '.join(users)}) clashes with another flag: "
                                 f"{err}") from None

    def build(self, name, *args, **kwargs):
        """Call the entry; options that are None are dropped so the entry's own defaults win."""
        return self.get(name)(*args, **{k: v for k, v in kwargs.items() if v is not None})

    def help(self):
        return f"one of: {', '.join(self.names())}"
