"""The `bastion` subcommands, one module each (see `bastion.cli`)."""
