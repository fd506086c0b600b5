"""The ``fused-entropy`` command.

    fused-entropy bench [...]    speed and working memory next to the peers (fused_entropy.tools.bench)
    fused-entropy demo [...]     entropy collapse under GRPO and the entropy controls (fused_entropy.tools.demo)
    fused-entropy aot [...]      ahead-of-time compile gate for sm_80/sm_90 (fused_entropy.tools.aot)
    fused-entropy gpucheck [...] everything a short GPU lease should settle (fused_entropy.tools.gpucheck)

Each subcommand is a module with ``main(argv) -> int`` and its own argument parser; this file only
dispatches, importing the module (and torch) when the subcommand runs. To add one, add a line to
``COMMANDS``.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# name -> (module with main(argv), one-line help)
COMMANDS = {
    "bench": ("fused_entropy.tools.bench", "time and working memory of each provider (this package, "
              "the materialized reference, TRL, Liger) on the machine it finds"),
    "demo": ("fused_entropy.tools.demo", "entropy collapse under GRPO on a toy task, and what the "
             "entropy-control methods do about it"),
    "aot": ("fused_entropy.tools.aot", "compile every Triton kernel for sm_80/sm_90 without a GPU: "
            "registers, spills, shared memory, tensor cores; --roofline"),
    "gpucheck": ("fused_entropy.tools.gpucheck", "one capped command for a lent GPU: environment and ceilings, "
                 "correctness of the shipped tiles, speed next to the peers, the test suite on CUDA"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fused-entropy <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "'fused-entropy <command> --help' describes a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"fused-entropy {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fused-entropy: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
