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
from pathlib import Path

from atomic import write_json_atomic


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every flag's default. A default of
    None (unset) is left to the flag's own help, which says what happens then."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def plain_config(cfg, **extra):
    """The run's settings as JSON values: cfg's attributes (lists and paths as they were given)
    and the extra entries resolved at run time."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
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
