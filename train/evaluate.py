"""`python train/evaluate.py --help`: the command line of :mod:`cgpt.cli.evaluate` (also `cgpt-evaluate`)."""

from cgpt.cli.evaluate import main

if __name__ == "__main__":
    main()
