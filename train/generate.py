"""`python train/generate.py --help`: the command line of :mod:`cgpt.cli.generate` (also `cgpt-generate`)."""

from cgpt.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
