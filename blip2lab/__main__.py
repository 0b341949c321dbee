"""`python -m blip2lab ...`, which is what `accelerate launch -m blip2lab train ...` runs on every process."""

import sys

from blip2lab.cli import main

sys.exit(main())
