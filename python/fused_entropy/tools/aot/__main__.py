"""``python -m fused_entropy.tools.aot``: the gate's command line (see the package docstring)."""
import sys

from . import main

sys.exit(main())
