"""`python -m pgvault` runs the command line."""

from pgvault.cli import main

raise SystemExit(main())
