"""``python -m prefopt`` (and ``accelerate launch -m prefopt``, ``torchrun -m prefopt``)."""

import sys

from prefopt.cli import main

sys.exit(main())
