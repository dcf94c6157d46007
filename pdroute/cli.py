"""The ``pdroute`` command: one entry point, one subcommand per deployable.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported lazily so ``pdroute sim`` never loads
the EPP's gRPC stubs and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "epp": ("epp.cmd", "run the endpoint picker (Envoy ext_proc server)"),
    "sim": ("pdroute.sim.cmd", "run simulated vLLM-compatible model servers"),
    "sidecar": ("vllm_sidecar.cmd", "run the P/D sidecar in front of a decode vLLM"),
    "up": ("pdroute.stack.cmd", "run the local stack: Envoy + EPP + model servers"),
    "bbr": ("epp.bbr.cmd", "run body-based routing (model name -> header) as an ext_proc"),
    "bench": ("pdroute.bench.cmd", "run benchmarks and write results"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdroute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    run = getattr(args, "_run", None)
    if run is None:  # pragma: no cover - argparse already required a command
        parser.print_help()
        return 2
    code = run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
