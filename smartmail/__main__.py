"""`python -m smartmail` runs the CLI."""

from .cli import entry

entry()
