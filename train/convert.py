"""`python train/convert.py --help`: the command line of :mod:`cgpt.cli.convert` (also `cgpt-convert`)."""

from cgpt.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
