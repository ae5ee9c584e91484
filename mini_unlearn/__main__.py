"""``python -m mini_unlearn`` runs the command line (see :mod:`mini_unlearn.cli`)."""
import sys

from .cli import main

sys.exit(main())
