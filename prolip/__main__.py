"""``python -m prolip``: the same as the ``prolip`` command."""

import sys

from prolip.cli import main

sys.exit(main())
