"""`python -m dilexp.compare`."""

import sys

from dilexp.compare.cli import main

sys.exit(main())
