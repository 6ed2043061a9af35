"""lm-evaluation-harness's command line with the ``cgpt`` model registered:
``python -m cgpt.cli.lm_eval --model cgpt --model_args pretrained=<any weights source> --tasks ...``
(also ``python -m cgpt.lm_eval_adapter ...`` and ``cgpt-lm-eval ...``)."""

from __future__ import annotations

import cgpt.lm_eval_adapter  # noqa: F401  (registers the cgpt model with lm-eval)


def main() -> None:
    """lm-eval's command line with the ``cgpt`` model registered."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install lm-eval") from None
    cli_evaluate()


if __name__ == "__main__":
    main()
