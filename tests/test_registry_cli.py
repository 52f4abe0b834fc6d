"""The Registry helper and the shared flag parsing."""
import argparse

import pytest

from maskcls import cli
from maskcls.registry import Registry, UnknownName


def test_register_build_and_names():
    reg = Registry("thing")

    @reg.register()
    def alpha(x, scale=2):
        return x * scale

    @reg.register("beta", size=3)
    class Beta:
        def __init__(self, x):
            self.x = x

    assert reg.names() == ["alpha", "beta"]
    assert reg.build("alpha", 3) == 6
    assert reg.build("alpha", 3, scale=None) == 6  # None means "the entry's own default"
    assert reg.build("beta", 1).x == 1
    assert reg.meta("beta") == {"size": 3} and reg.meta("alpha") == {}
    assert reg.get(alpha) is alpha  # an object passed in is used as it is
    assert "alpha" in reg and "gamma" not in reg


def test_duplicate_and_instance_refused():
    reg = Registry("thing")
    reg.register("a")(dict)
    with pytest.raises(ValueError, match="twice"):
        reg.register("a")(list)
    with pytest.raises(TypeError, match="not instances"):
        reg.register("b")(object())


def test_unknown_name_lists_choices_and_closest_match():
    reg = Registry("criterion")
    for name in ("focal", "new_focal", "cross_entropy"):
        reg.register(name)(dict)
    with pytest.raises(UnknownName) as err:
        reg.get("focall")
    message = str(err.value)
    assert isinstance(err.value, cli.UserError)
    assert "did you mean 'focal'" in message
    assert "cross_entropy, focal, new_focal" in message
    assert "\n" not in message


@pytest.mark.parametrize("text,value", [("True", True), ("false", False), ("1", True), ("0", False),
                                        ("yes", True), ("No", False), ("on", True), ("off", False)])
def test_str2bool(text, value):
    assert cli.str2bool(text) is value


def test_str2bool_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError):
        cli.str2bool("maybe")


def test_parse_size():
    assert cli.parse_size("299,299") == (299, 299)
    assert cli.parse_size("128,96") == (128, 96)
    assert cli.parse_size("224") == (224, 224)
    for bad in ("", "a,b", "0,10", "1,2,3", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_size(bad)


def _parser():
    parser = cli.ArgumentParser(prog="t")
    parser.add_argument("--batch_size", type=int, default=1)
    cli.bool_flag(parser, "--cutmix")
    parser.add_argument("--resize", type=cli.parse_size)
    return parser


def test_kebab_aliases_and_bool_flags():
    args = _parser().parse_args(["--batch-size", "16", "--cutmix", "False", "--resize=299,299"])
    assert args.batch_size == 16 and args.cutmix is False and args.resize == (299, 299)
    assert _parser().parse_args(["--cutmix"]).cutmix is True
    assert _parser().parse_args(["--cutmix", "True"]).cutmix is True
    assert _parser().parse_args(["--batch-size=8"]).batch_size == 8


def test_bad_flag_is_a_user_error():
    with pytest.raises(cli.UserError, match="--cutmix"):
        _parser().parse_args(["--cutmix", "maybe"])
    with pytest.raises(cli.UserError, match="unrecognized"):
        _parser().parse_args(["--batch"])  # no silent abbreviation


def test_run_prints_one_line_and_exits_2(capsys):
    def main(args):
        raise cli.UserError("data folder nowhere does not exist")
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, _parser, [])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: data folder nowhere does not exist") and "\n" not in err
