"""`python -m smartmail` runs the CLI."""

from .cli import main

main()
