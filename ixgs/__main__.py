"""``python -m ixgs``: the same as the ``ixgs`` command (used by the Slicer modules' background process)."""
import sys

from .cli import main

sys.exit(main())
