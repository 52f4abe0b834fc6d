"""Command-line plumbing shared by every script: user errors, flag parsing, the main wrapper.

- `UserError`: raise it for anything a user can cause (bad path, bad value, unknown name).
  `run(main)` prints it as one line on stderr and exits with status 2, no traceback.
- `ArgumentParser`: argparse with one-line errors and kebab-case aliases for every
  snake_case flag (`--batch-size` works wherever `--batch_size` does).
- `str2bool`, `parse_size`, `parse_floats`: flag types (never argparse's plain bool type:
  it makes `--cutmix False` true).

Example: `python train.py --cutmix False --resize 299,299`
"""
import argparse
import os
import sys


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse that accepts kebab-case aliases and reports a bad flag in one line.

    A parser with a `--config FILE` option reads options from a YAML/JSON file first, so that
    flags on the command line override it; with `--resume RUN` it reads RUN/config.json the same
    way. Keys in `derived_keys` (values a run records but nobody sets) are skipped.
    """

    def __init__(self, *args, derived_keys=(), **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo should not silently pick another flag
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.derived_keys = set(derived_keys)

    def parse_args(self, args=None, namespace=None):
        argv = _snake_flags(sys.argv[1:] if args is None else list(args))
        known, _ = self.parse_known_args(argv)
        path = getattr(known, "config", None)
        if getattr(known, "resume", None):
            path = os.path.join(known.resume, "config.json")
            if not os.path.isfile(path):
                raise UserError(f"--resume {known.resume}: not a run folder (no config.json)")
        if path:
            argv = self.options_argv(read_options_file(path), path) + argv
        return super().parse_args(argv, namespace)

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
            elif isinstance(value, (list, tuple)):
                argv += [flag, ",".join(map(str, value))]
            else:
                argv += [flag, str(value)]
        return argv

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def run(main, parser_fn, argv=None):
    """Parse flags and call `main(args)`; a UserError becomes one line on stderr and exit 2."""
    try:
        args = parser_fn().parse_args(argv)
        return main(args)
    except UserError as err:
        message = str(err).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original line
            message = message.splitlines()[-1].split("UserError: ", 1)[-1]
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "error"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
