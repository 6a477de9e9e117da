"""Allow ``python -m medlb``."""

from medlb.cli import main

raise SystemExit(main())
