"""CLI subcommands: one module each, registered in tierd.cli.COMMANDS."""
