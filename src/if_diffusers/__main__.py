"""`python -m if_diffusers ...`: the `if-diffusers` command line."""

import sys

from .cli import main

sys.exit(main())
