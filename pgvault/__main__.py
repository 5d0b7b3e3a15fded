"""`python -m pgvault` runs the command line (through the async fast path, as the script does)."""

from pgvault._fastpath import main

raise SystemExit(main())
