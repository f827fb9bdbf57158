"""``python -m tristream`` runs the command line."""

import os
import sys

# `-m` puts the working directory first on sys.path. In a checkout of tristream that is the repository root,
# whose kernels/ folder would hide the installed `kernels` package that transformers imports.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from tristream.cli import main  # noqa: E402

sys.exit(main())
