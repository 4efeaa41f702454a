"""`python -m forkdec ...` runs the same command line as `forkdec ...`."""
from forkdec.cli import main

raise SystemExit(main())
