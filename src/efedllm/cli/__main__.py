"""``python -m efedllm.cli``: what the ``efedllm`` script runs (``LocalSwarm`` starts servers this way)."""

import sys

from efedllm.cli import main

sys.exit(main())
