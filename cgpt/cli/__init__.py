"""Command-line tools that need no Hydra: each module has ``main(argv)``; ``train/<name>.py`` and the
``cgpt-<name>`` console scripts call it (``python -m cgpt.cli.<name>`` works too)."""
