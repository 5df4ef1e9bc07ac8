"""`python -m unik.cli ...`: the `unik` command, for runs without the console script (tests, unik.testing)."""

from unik.cli import main

if __name__ == "__main__":
    main()
