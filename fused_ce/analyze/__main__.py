"""``python -m fused_ce.analyze [--plot PATH]``."""

from .plot import main

raise SystemExit(main())
