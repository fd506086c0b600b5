"""Former path of :mod:`fused_entropy.tools.bench.worker`: ``python -m fused_entropy.tools.bench_worker
...`` still runs it, and importing this name gives that module."""
import sys

from .bench import worker as _worker

if __name__ == "__main__":
    sys.exit(_worker.main())
sys.modules[__name__] = _worker
