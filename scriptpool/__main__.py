"""``python -m scriptpool``: the command line."""

import sys

from scriptpool._cli import main

sys.exit(main())
