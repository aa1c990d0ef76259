"""What every script's command line shares: help that shows each flag's default, and the
configuration a run really used, printed in its header and written beside its outputs.

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    cfg = parser.parse_args(argv)          # a run's configuration is always called cfg
    print(cli.config_line(cfg))            # the header line: every setting, defaults included
    cli.write_config(out_dir, cfg)         # OUT_DIR/config.json, the same settings as JSON

A setting that is only resolved once the run has started (a default that depends on the
model, the number of processes) goes into config.json as extra entries beside the flags.
"""
import argparse
import copy
import math
from pathlib import Path

from atomic import write_json_atomic


def ranged(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a number of `kind` (int or float) within [low, high] (open ends where
    asked), so that a value out of range stops at the flag, naming it, before it can reach a
    division or a tensor shape. Its __name__ is the range, which --help and errors show."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {parse.__name__}")
        return value
    parse.__name__ = parse.allowed = describe_range(kind, low, high, low_open, high_open)
    return parse


def describe_range(kind, low, high, low_open, high_open):
    noun = "an integer" if kind is int else "a number"
    if high is None:
        return f"{noun} {'>' if low_open else '>='} {low}"
    return f"{noun} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


POSITIVE_INT, COUNT = ranged(int, 1), ranged(int, 0)  # COUNT: 0 allowed (often "off" or "unset")
POSITIVE, NON_NEGATIVE, FRACTION = ranged(float, 0, low_open=True), ranged(float, 0), ranged(float, 0, 1, high_open=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every flag's default. A default of
    None (unset) is left to the flag's own help, which says what happens then."""

    def _get_help_string(self, action):
        allowed = getattr(action.type, "allowed", None)  # a ranged() flag: say its range
        if allowed and action.help:
            action = copy.copy(action)
            action.help = f"{action.help}; {allowed}"
        return action.help if action.default is None else super()._get_help_string(action)


def plain_config(cfg, **extra):
    """The run's settings as JSON values: cfg's attributes (lists and paths as they were given)
    and the extra entries resolved at run time."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (int, float, str, bool, type(None))):
            return value
        return str(value)
    return {k: plain(v) for k, v in {**vars(cfg), **extra}.items()}


def config_line(cfg, **extra):
    """One line for a run's header: every setting as name=value."""
    return "config: " + " ".join(f"{k}={v}" for k, v in plain_config(cfg, **extra).items())


def write_config(out_dir, cfg, **extra):
    """Write OUT_DIR/config.json (atomically): exactly the settings this run used."""
    path = Path(out_dir) / "config.json"
    write_json_atomic(path, plain_config(cfg, **extra))
    return path
