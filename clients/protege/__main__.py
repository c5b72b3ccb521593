"""`python -m protege ...` runs the `protege` command line (see `protege.cli`)."""

from protege.cli import main

if __name__ == "__main__":
    main()
