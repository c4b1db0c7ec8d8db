"""The flags every command shares: ``--config YAML`` and ``--section.field`` config flags."""

from __future__ import annotations

import argparse

from genpi.config import GenPIConfig, add_config_flags, load_config, overrides_from_args


def add_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ()) -> None:
    """``--config`` and the config flags of ``sections`` (every section when empty)."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of config values, applied over the profile")
    add_config_flags(parser, sections)


def resolve(args: argparse.Namespace, profile: str = "local") -> GenPIConfig:
    """The validated config: ``profile``, then the YAML file, then the flags."""
    return load_config(profile, args.config, overrides_from_args(args))
