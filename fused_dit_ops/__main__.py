"""Command line: ``python -m fused_dit_ops {env,check,bench}``."""
from __future__ import annotations

import argparse
import importlib
import sys


def _cmd_env(_args) -> int:
    from .env import report
    print(report())
    return 0


def _cmd_check(args) -> int:
    from .check import run_check
    return run_check(device=args.device, small=args.small)


def _cmd_bench(args) -> int:
    from .bench import BENCHES
    if args.name not in BENCHES:
        print(f"unknown benchmark {args.name!r}; choose from: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHES[args.name]).main(args.rest)


def _cmd_profile(rest) -> int:
    from .profiler import main as profile_main
    return profile_main(rest)


def _cmd_demo(args) -> int:
    from .demo import main as demo_main
    return demo_main(args.rest)


def main(argv=None) -> int:
    _argv = list(sys.argv[1:] if argv is None else argv)
    if _argv[:1] == ["demo"]:  # argparse REMAINDER cannot start with an option (--device ...)
        return _cmd_demo(argparse.Namespace(rest=_argv[1:]))
    # `profile` takes its own options (--a, --b, ...): hand them over before argparse sees them
    if _argv[:1] == ["profile"]:
        return _cmd_profile(_argv[1:])
    p = argparse.ArgumentParser(prog="python -m fused_dit_ops", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="versions, GPU, compiled extension, optional backends")
    c = sub.add_parser("check", help="every op on the device against the reference: pass/fail table")
    c.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    c.add_argument("--small", action="store_true", help="small shapes (default on CPU)")
    b = sub.add_parser("bench", help="benchmarks (GPU); JSON written to bench/results/")
    b.add_argument("name", help="which benchmark: modulation, ...")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for that benchmark (see its --help)")
    sub.add_parser("profile", help="one block of one forward, two configurations, kernel by kernel "
                   "(see profile --help)")
    d = sub.add_parser("demo", help="stock vs fused diffusers Qwen-Image-Edit transformer: ms/layer, speedup, error",
                       add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the demo (see demo --help)")
    args = p.parse_args(argv)
    return {"env": _cmd_env, "check": _cmd_check, "bench": _cmd_bench,
            "demo": _cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
