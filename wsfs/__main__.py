"""`python -m wsfs` is the `wsfs` command."""

import sys

from .commands.cli import main

sys.exit(main())
