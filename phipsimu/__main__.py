"""``python -m phipsimu demo``."""

import sys

from phipsimu._cli import main

sys.exit(main())
