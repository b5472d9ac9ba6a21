"""``python -m zip2zip_hf``: see `zip2zip_hf.cli`."""

from .cli import main


raise SystemExit(main())
