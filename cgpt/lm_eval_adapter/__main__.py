"""``python -m cgpt.lm_eval_adapter``: the command line lives in :mod:`cgpt.cli.lm_eval`."""

from cgpt.cli.lm_eval import main

main()
