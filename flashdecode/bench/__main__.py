import sys

from flashdecode.bench.cli import main

sys.exit(main())
