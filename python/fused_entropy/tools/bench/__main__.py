"""``python -m fused_entropy.tools.bench``: the same as ``fused-entropy bench``."""
import sys

from . import main

sys.exit(main())
