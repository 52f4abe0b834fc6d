"""The one `Registry` helper behind every kind of plug-in (dataset, model, criterion, augmentation).

Add an entry by decorating a class or factory in its own module:

    from registry import Registry
    MODELS = Registry("model")

    @MODELS.register("myNet", input_size=(224, 224))
    def my_net(num_classes, **kwargs):
        return MyNet(num_classes)

Then `python train.py --model myNet` builds it. An unknown name is a `UserError` that lists the
valid names and the closest match; a duplicate name raises at import time.
"""
import difflib
import functools
import inspect

from cli import UserError


class UnknownName(UserError):
    pass


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._entries = {}  # name -> (class or factory, metadata dict)

    def register(self, name=None, **meta):
        """Decorator: register a class or factory under `name` (default: its own name)."""
        def add(obj):
            key = name or obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            if not (inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, functools.partial)):
                raise TypeError(f"register classes or factories, not instances: {key!r}")
            self._entries[key] = (obj, dict(meta))
            return obj
        return add

    def names(self):
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def unknown(self, name, extra_choices=(), hint=""):
        """The error for an unknown name: sorted choices and the closest match."""
        close = difflib.get_close_matches(str(name), list(self._entries) + list(extra_choices), n=1)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        return UnknownName(f"unknown {self.kind} {name!r}{guess} valid names: "
                           f"{', '.join(self.names())}{hint}")

    def get(self, name):
        """The registered class or factory; a callable passed in is returned unchanged."""
        if callable(name):
            return name
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name][0]

    def meta(self, name):
        """The metadata given at registration ({} for an object that was passed in)."""
        return dict(self._entries[name][1]) if isinstance(name, str) and name in self._entries else {}

    def build(self, name, *args, **kwargs):
        """Call the entry; options that are None are dropped so the entry's own defaults win."""
        return self.get(name)(*args, **{k: v for k, v in kwargs.items() if v is not None})

    def help(self):
        return f"one of: {', '.join(self.names())}"
