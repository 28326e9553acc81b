"""``python -m pathflow`` runs the command line."""

import sys

from pathflow.cli import main

sys.exit(main())
