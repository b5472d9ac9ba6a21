"""``python -m zip2zip_hf``: see `zip2zip_hf.tools.cli`."""

from .tools.cli import main


raise SystemExit(main())
