"""`python -m lit_mamba2 <command> ...`, and the entry script for launchers that take a file
(`fabric run [...] path/to/lit_mamba2/__main__.py pretrain ...`, `torchrun ... -m lit_mamba2 pretrain ...`)."""

import os
import sys

if not __package__:
    # Run as a file: Python put this package's own directory first on sys.path, where its module names could
    # shadow others; the installed package is what should be imported.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

from lit_mamba2.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
