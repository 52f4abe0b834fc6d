"""Command-line plumbing shared by every script: user errors, flag parsing, the main wrapper.

- `UserError`: raise it for anything a user can cause (bad path, bad value, unknown name).
  `run(main)` prints it as one line on stderr and exits with status 2, no traceback.
- `ArgumentParser`: argparse with one-line errors and kebab-case aliases for every
  snake_case flag (`--batch-size` works wherever `--batch_size` does).
- `str2bool`, `parse_size`, `parse_floats`, `number(...)`: flag types, checked when the flags
  are parsed (never argparse's plain bool type: it makes `--cutmix False` true).
- `progress(iterable, desc)`: a tqdm bar on a terminal; in a log (stderr not a terminal), a line
  every ~10% or 30 s instead of nothing for minutes.

Example: `python train.py --cutmix False --resize 299,299`
"""
import argparse
import errno
import math
import os
import sys
import time


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str2bool(text):
    """Parse True/False/1/0/yes/no/on/off (any case)."""
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0/yes/no, got {text!r}")


def parse_size(text):
    """Parse an input size 'H,W' (or a single 'S' for a square) into a (H, W) tuple of ints."""
    parts = [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected H,W as two positive integers (e.g. 299,299), got {text!r}")
    return size


def parse_floats(text):
    """Parse a comma-separated list of floats, e.g. '0.9,1,1'."""
    try:
        return [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_ints(text):
    """A comma-separated list of integers, e.g. '30,58'."""
    try:
        return [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """A flag type: a finite `kind` (float or int) within [low, high] (an open end with *_open),
    checked when the flags are parsed: `--lr nan` or `--num_workers -1` is one line, not a
    traceback from deep inside torch after the run folder was made."""
    bounds = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
              f"{'inf' if high is None else high}{')' if high_open else ']'}")

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        ok = value is not None and math.isfinite(value) and not (
            low is not None and (value < low or (low_open and value == low))) and not (
            high is not None and (value > high or (high_open and value == high)))
        if not ok:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} in {bounds}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_kwargs(text):
    """'k=v,k2=v2' -> a dict; values read as bool, int, float or left as text (--opt_kwargs)."""
    out = {}
    for item in (p.strip() for p in str(text).split(",") if p.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected k=v,k2=v2, got {text!r}")
        value = value.strip()
        if value.lower() in _TRUE | _FALSE and not value.isdigit():
            out[key.strip()] = value.lower() in _TRUE
            continue
        for kind in (int, float):
            try:
                out[key.strip()] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value
    return out


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def ratio(text):
    """A float strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


class SizeAction(argparse.Action):
    """`--resize 128,96`, `--resize 128 96` (the public baseline's two words) or `--resize 224`."""

    def __call__(self, parser, namespace, values, option_string=None):
        words = values if isinstance(values, list) else [values]
        try:
            size = parse_size(",".join(words))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, size)


def size_flag(group, *names, **kwargs):
    return group.add_argument(*names, action=SizeAction, nargs="+", metavar="H,W", **kwargs)


def bool_flag(group, *names, default=False, help=""):
    """Add a boolean flag: `--x`, `--x True`, `--x no` all work."""
    return group.add_argument(*names, type=str2bool, nargs="?", const=True, default=default,
                              metavar="BOOL", help=help)


def _snake_flags(argv):
    """Rewrite `--kebab-case[=v]` option names to `--snake_case[=v]`; values are left alone."""
    out, options_done = [], False
    for token in argv:
        if options_done or not token.startswith("--") or token == "--":
            options_done = options_done or token == "--"
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        out.append("--" + name[2:].replace("-", "_") + eq + value)
    return out


def read_options_file(path):
    """A YAML or JSON file of options (a mapping of flag name -> value)."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    import yaml  # JSON is YAML too: one parser reads both
    try:
        with open(path) as f:
            options = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(options, dict):
        raise UserError(f"{path} must hold a mapping of option: value")
    return options


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once: added where the help does not already say it, and never 'None'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that accepts kebab-case aliases and reports a bad flag in one line.

    A parser with a `--config FILE` option reads options from a YAML/JSON file first, so that
    flags on the command line override it; with `--resume RUN` it reads RUN/config.json the same
    way. Keys in `derived_keys` (values a run records but nobody sets) are skipped.
    """

    def __init__(self, *args, derived_keys=(), after_parse=None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo should not silently pick another flag
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.derived_keys = set(derived_keys)
        self.after_parse = after_parse  # fn(args, given): checks that need to know what was typed
        self.given = set()

    def parse_args(self, args=None, namespace=None):
        command_line = _snake_flags(sys.argv[1:] if args is None else list(args))
        known, _ = self.parse_known_args(command_line)
        path = getattr(known, "config", None)
        if getattr(known, "resume", None):
            path = os.path.join(known.resume, "config.json")
            if not os.path.isfile(path):
                raise UserError(f"--resume {known.resume}: not a run folder (no config.json)")
        argv = (self.options_argv(read_options_file(path), path) if path else []) + command_line
        parsed = super().parse_args(argv, namespace)
        self.given = self.dests_in(command_line)
        if self.after_parse is not None:
            self.after_parse(parsed, self.given)
        return parsed

    def dests_in(self, argv):
        """The flags (by dest) that `argv` sets explicitly."""
        found = set()
        for token in argv:
            if token == "--":
                break
            action = self._option_string_actions.get(token.split("=", 1)[0])
            if action is not None:
                found.add(action.dest)
        return found

    def options_argv(self, options, path):
        """Options from a file as command-line words, so they get the flags' own parsing."""
        actions = {a.dest: a for a in self._actions if a.option_strings}
        argv = []
        for key, value in options.items():
            key = str(key).replace("-", "_")
            if key in self.derived_keys or key in ("config", "resume") or value is None:
                continue
            if key not in actions:
                raise UserError(f"{path}: unknown option {key!r} (see {self.prog} --help)")
            flag = f"--{key}"
            if isinstance(actions[key], argparse._AppendAction):
                for item in value if isinstance(value, list) else [value]:
                    argv += [flag, str(item)]
            elif isinstance(value, dict):  # --opt_kwargs
                argv += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
            elif isinstance(value, (list, tuple)):
                argv += [flag, ",".join(map(str, value))]
            else:
                argv += [flag, str(value)]
        return argv

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------- progress
LOG_EVERY_SHARE, LOG_EVERY_SECONDS = 0.1, 30.0  # in a log: a line per 10% done, or per 30 s,
LOG_MIN_SECONDS = 2.0  # but not more often than this: a task of a few seconds prints nothing


class LogProgress:
    """tqdm's interface for a log file: a line every LOG_EVERY_SHARE of the total (or every
    LOG_EVERY_SECONDS where the total is unknown or slow), with the postfix tqdm would show."""

    def __init__(self, iterable=None, desc="", total=None, unit="it", file=None):
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file or sys.stderr
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.start = 0, "", time.time()
        self.logged_at, self.logged_n = self.start, 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n=1):
        self.n += n
        now = time.time()
        step = max(1, math.ceil(self.total * LOG_EVERY_SHARE)) if self.total else None
        quiet = now - self.logged_at < LOG_MIN_SECONDS
        if (step and self.n - self.logged_n >= step and not quiet) or now - self.logged_at >= LOG_EVERY_SECONDS:
            self.log(now)

    def log(self, now):
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        rate = self.n / max(now - self.start, 1e-9)
        print(f"{self.desc}: {done} {self.unit}, {now - self.start:.0f} s, {rate:.1f} {self.unit}/s"
              f"{'; ' + self.postfix if self.postfix else ''}", file=self.file, flush=True)
        self.logged_at, self.logged_n = now, self.n

    def close(self):
        if self.logged_n and self.n != self.logged_n:  # a task that said anything says when it is done
            self.log(time.time())


def progress(iterable=None, desc="", total=None, unit="it", disable=False, leave=False):
    """A progress bar: tqdm on a terminal, LogProgress lines when stderr goes to a file or pipe."""
    if disable:
        from tqdm import tqdm
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True)
    return LogProgress(iterable, desc, total, unit)


def _disk_full_line(err):
    where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
    return f"disk full{where}: {os.strerror(err.errno)}; free some space and run again"


def run(main, parser_fn, argv=None):
    """Parse flags and call `main(args)`; a UserError becomes one line on stderr and exit 2."""
    try:
        args = parser_fn().parse_args(argv)
        return main(args)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"{os.path.basename(sys.argv[0]) or 'error'}: error: {_disk_full_line(err)}", file=sys.stderr)
        sys.exit(2)
    except UserError as err:
        message = str(err).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original line
            message = message.splitlines()[-1].split("UserError: ", 1)[-1]
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "error"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
