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
import dataclasses
import errno
import math
import os
import re
import signal
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
        values = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        values = None
    if values is None or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated (finite) numbers, got {text!r}")
    return values


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


def positive_int_or(word):
    """positive_int, or the `word` itself (`--batch_size auto`)."""
    def parse(text):
        return word if str(text).strip().lower() == word else positive_int(text)
    parse.__name__ = "int"
    return parse


def ratio(text):
    """A float strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


class WordsAction(argparse.Action):
    """A list flag in one word or several: `--resize 128,96` or `--resize 128 96` (the public
    baseline's two words), `--opt_betas 0.9,0.999` or timm's `--opt-betas 0.9 0.999`. The words
    are joined with commas and parsed by the flag's `parse`."""

    def __init__(self, *args, parse=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parse = parse

    def __call__(self, parser, namespace, values, option_string=None):
        words = values if isinstance(values, list) else [values]
        try:
            value = self.parse(",".join(words))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, value)


def words_flag(group, *names, parse, metavar, **kwargs):
    """A flag whose value is a list given in one word (commas) or several."""
    return group.add_argument(*names, action=WordsAction, parse=parse, nargs="+", metavar=metavar, **kwargs)


def size_flag(group, *names, **kwargs):
    return words_flag(group, *names, parse=parse_size, metavar="H,W", **kwargs)


def bool_flag(group, *names, default=False, help="", alpha=None):
    """Add a boolean flag: `--x`, `--x True`, `--x no` all work. `alpha`: the flag that takes
    the number timm's flag of the same name takes (`--mixup 0.2` is timm's MixUp alpha: here
    `--mixup_alpha 0.2`), named when a number is given."""
    return group.add_argument(*names, type=switch(alpha) if alpha else str2bool, nargs="?", const=True,
                              default=default, metavar="BOOL", help=help)


def switch(alpha_flag):
    """str2bool that points a number (other than 0 and 1) at `alpha_flag`."""
    def parse(text):
        try:
            return str2bool(text)
        except argparse.ArgumentTypeError:
            try:
                float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected True/False/1/0/yes/no, got {text!r}") from None
            raise argparse.ArgumentTypeError(f"a switch here (True/False), got {text!r}; timm's alpha is "
                                             f"{alpha_flag} {text}") from None
    parse.__name__ = "bool"
    return parse


def _snake_flags(argv):
    """Rewrite `--kebab-case[=v]` option names to `--snake_case[=v]`; values are left alone.
    Returns (the rewritten argv, {snake name: the name as typed})."""
    out, typed, options_done = [], {}, False
    for token in argv:
        if options_done or not token.startswith("--") or token == "--":
            options_done = options_done or token == "--"
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        snake = "--" + name[2:].replace("-", "_")
        typed.setdefault(snake, name)
        out.append(snake + eq + value)
    return out, typed


@dataclasses.dataclass
class Foreign:
    """A flag of another tool (timm's train.py) that a parser does not have: `rewrite(words, argv)`
    turns it and its `nargs` value words into this parser's words (it means the same), or `hint`
    refuses it in one line naming what to use instead."""
    nargs: object = 0          # value words: a count, "?" (0 or 1) or "+" (1 or more)
    rewrite: object = None
    hint: str = ""


def _is_value(token):
    return not token.startswith("-") or _NUMBER.match(token) is not None


_NUMBER = re.compile(r"^-\d|^-\.\d")


def _translate_foreign(argv, foreign, typed):
    """argv with every flag of `foreign` rewritten, or a UserError naming it as typed."""
    out, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        spec = foreign.get(name[2:]) if name.startswith("--") else None
        if spec is None:
            out.append(argv[i])
            i += 1
            continue
        words, i = ([value] if eq else []), i + 1
        most = {0: 0, "?": 1, "+": len(argv)}.get(spec.nargs, spec.nargs)
        while not eq and len(words) < most and i < len(argv) and _is_value(argv[i]):
            words.append(argv[i])
            i += 1
        shown = typed.get(name, name)
        if spec.rewrite is None:
            raise UserError(f"{shown} is timm's flag, not this one's: {spec.hint}")
        needs = {"?": 0, "+": 1}.get(spec.nargs, spec.nargs)
        if len(words) < needs:
            raise UserError(f"{shown} expects {needs} value(s), got {len(words)}")
        out += spec.rewrite(words, argv)
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

    def __init__(self, *args, derived_keys=(), after_parse=None, foreign=None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo should not silently pick another flag
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.derived_keys = set(derived_keys)
        self.after_parse = after_parse  # fn(args, given): checks that need to know what was typed
        self.foreign = foreign or {}  # snake name -> Foreign: other tools' flags, translated or refused
        self.given, self.typed = set(), {}

    def parse_args(self, args=None, namespace=None):
        command_line, self.typed = _snake_flags(sys.argv[1:] if args is None else list(args))
        command_line = _translate_foreign(command_line, self.foreign, self.typed)
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
        """One line, naming each flag as the user typed it (`--batch-size`, not `--batch_size`)."""
        for snake, typed in sorted(self.typed.items(), key=lambda item: -len(item[0])):
            if typed != snake:
                message = re.sub(re.escape(snake) + r"(?![\w-])", typed, message)
        raise UserError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------- progress
LOG_EVERY_SHARE, LOG_EVERY_SECONDS = 0.25, 60.0  # in a log: a line per quarter done, or per minute,
LOG_MIN_SECONDS = 20.0  # but not more often than this: a task of under 20 s prints nothing (an
# epoch's own row follows it: more lines only repeat a loss that has not moved)


class LogProgress:
    """tqdm's interface for a log file: a line every LOG_EVERY_SHARE of the total (or every
    LOG_EVERY_SECONDS where the total is unknown or slow), with the time left and the postfix
    tqdm would show. `live(fn)` gives a postfix computed when a line is printed (a running mean
    read then, not a value set some steps before)."""

    def __init__(self, iterable=None, desc="", total=None, unit="it", file=None):
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file or sys.stderr
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.postfix_fn, self.start = 0, "", None, time.time()
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

    def live(self, fn):
        """fn() -> {name: text}: the postfix, evaluated at each printed line."""
        self.postfix_fn = fn

    def update(self, n=1):
        self.n += n
        now = time.time()
        step = max(1, math.ceil(self.total * LOG_EVERY_SHARE)) if self.total else None
        quiet = now - self.logged_at < LOG_MIN_SECONDS
        if (step and self.n - self.logged_n >= step and not quiet) or now - self.logged_at >= LOG_EVERY_SECONDS:
            self.log(now)

    def log(self, now):
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        left = f", {duration((self.total - self.n) / rate)} left" if self.total and 0 < self.n < self.total else ""
        if self.postfix_fn is not None:
            self.set_postfix(**self.postfix_fn())
        print(f"{self.desc}: {done} {self.unit}, {elapsed:.0f} s, {rate:.1f} {self.unit}/s{left}"
              f"{'; ' + self.postfix if self.postfix else ''}", file=self.file, flush=True)
        self.logged_at, self.logged_n = now, self.n

    def close(self):
        if self.logged_n and self.n != self.logged_n:  # a task that said anything says when it is done
            self.log(time.time())


def live_postfix(bar, fn, step, every=10):
    """Show fn()'s values beside a progress bar: in a log at each printed line (LogProgress.live),
    on a terminal every `every` steps (each call may synchronise with the GPU)."""
    if isinstance(bar, LogProgress):
        if step == 0:
            bar.live(fn)
    elif step % every == 0:
        bar.set_postfix(**fn())


def duration(seconds):
    """'42 s', '3.5 min' or '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


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


class Stopped(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's time limit, torchrun stopping its workers), raised in
    the main thread like Ctrl-C: a training stops the same way, its last.pth intact, and says how
    to resume. `args[0]` is the signal number."""


def stop_on_sigterm():
    """From now on SIGTERM stops this process as Ctrl-C does (Stopped), in the main thread."""
    def handler(signum, frame):
        raise Stopped(signum)
    signal.signal(signal.SIGTERM, handler)


def interrupt_status(err):
    """The exit status of a process stopped by `err` (a KeyboardInterrupt): 128 + the signal."""
    return 128 + (err.args[0] if isinstance(err, Stopped) and err.args else signal.SIGINT)


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def run(main, parser_fn, argv=None):
    """Parse flags and call `main(args)`; a UserError becomes one line on stderr and exit 2, as
    does a full disk or a folder this user cannot write; Ctrl-C (or SIGTERM) exits 130 (143)
    with one line."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "error"
    try:
        args = parser_fn().parse_args(argv)
        return main(args)
    except KeyboardInterrupt as err:
        print(f"{prog}: stopped ({'SIGTERM' if isinstance(err, Stopped) else 'Ctrl-C'})", file=sys.stderr)
        sys.exit(interrupt_status(err))
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            message = _disk_full_line(err)
        elif err.errno in NOT_WRITABLE and getattr(err, "filename", None):
            message = f"{err.filename}: {os.strerror(err.errno)}"
        else:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except UserError as err:
        message = str(err).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original line
            message = message.splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
