"""`python train/consolidate.py --help`: the command line of :mod:`cgpt.cli.consolidate` (also `cgpt-consolidate`)."""

from cgpt.cli.consolidate import main

if __name__ == "__main__":
    main()
