"""``python -m tristream`` runs the command line."""

import sys

from tristream.cli import main

sys.exit(main())
