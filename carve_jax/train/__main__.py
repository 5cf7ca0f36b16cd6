"""`python -m carve_jax.train ...` is `carve-train ...` (see `carve_jax.train.cli`)."""

import sys

from carve_jax.train.cli import main

sys.exit(main())
