"""``python -m cgpt.lora``: the command line lives in :mod:`cgpt.cli.lora`."""

from cgpt.cli.lora import main

raise SystemExit(main())
