"""`python -m wsfs` is the `wsfs` command."""

import sys

from .cli import main

sys.exit(main())
