"""``python -m flashdecode`` runs the command line."""

import sys

from flashdecode.cli import main

sys.exit(main())
