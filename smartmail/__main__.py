"""`python -m smartmail` runs the CLI."""

from .cli import entry

# Only when run: `entry()` ends the process (os._exit), which must not happen to a tool that
# imports every module (pytest --doctest-modules, a documentation generator).
if __name__ == "__main__":
    entry()
