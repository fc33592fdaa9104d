"""Command line: python -m fused_dit_ops {env,check,bench,profile,demo} (also installed as fused-dit-ops)."""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

PROG = "python -m fused_dit_ops"

# (name, one-line help) in the order the top-level help lists them
COMMANDS = (
    ("env", "what is installed and loaded: versions, GPU, the C++ extension (and why not), backends"),
    ("check", "run every op on this device against a float64 reference; pass/fail table"),
    ("bench", "benchmarks (GPU); 'bench' alone lists them, 'bench NAME --help' explains one"),
    ("profile", "one transformer block of one forward, two configurations side by side, kernel by "
                "kernel (needs diffusers; 'profile --help')"),
    ("demo", "stock vs fused diffusers Qwen-Image-Edit transformer: ms per layer, speedup, output "
             "error (needs diffusers; 'demo --help')"),
)

DESCRIPTION = (
    "fused-dit-ops: fused Triton/CUDA kernels for diffusion-transformer inference, registered as\n"
    "PyTorch custom ops (torch.ops.fused_dit.*).\n\ncommands:\n"
    + "\n".join(textwrap.fill(text, 96, initial_indent=f"  {name:<9}", subsequent_indent=" " * 11)
                for name, text in COMMANDS)
)
EPILOG = f"Each command has its own help: {PROG} COMMAND --help."


def _cmd_env(_args) -> int:
    from .env import report
    print(report())
    return 0


def _cmd_check(args) -> int:
    from .check import run_check
    return run_check(device=args.device, small=args.small)


def bench_list() -> str:
    """The benchmarks, one line each."""
    from .bench import BENCHES, DESCRIPTIONS
    width = max(len(n) for n in BENCHES)
    lines = ["benchmarks (JSON results are written to bench/results/ or --out):"]
    lines += [f"  {n:<{width}}  {DESCRIPTIONS.get(n, '')}".rstrip() for n in BENCHES]
    lines.append(f"run one: {PROG} bench NAME [options]; its options: {PROG} bench NAME --help")
    return "\n".join(lines)


def _cmd_bench(rest) -> int:
    """``bench NAME [args...]``: the named benchmark's ``main(args)``. Without a name: the list."""
    from .bench import BENCHES
    usage = f"usage: {PROG} bench NAME [options]"
    if not rest:
        print(f"{usage}\n{PROG} bench: a benchmark name is required\n\n{bench_list()}", file=sys.stderr)
        return 2
    if rest[0] in ("-h", "--help"):
        print(f"{usage}\n\n{bench_list()}")
        return 0
    name = rest[0]
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}; choose from: {', '.join(BENCHES)}\n\n{bench_list()}", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHES[name]).main(rest[1:])


def _cmd_profile(rest) -> int:
    from .profiler import main as profile_main
    return profile_main(rest)


def _cmd_demo(rest) -> int:
    from .demo import main as demo_main
    return demo_main(rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", help="one of the commands listed above")
    helps = dict(COMMANDS)
    sub.add_parser("env", description=helps["env"])
    c = sub.add_parser("check", description=helps["check"])
    c.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    c.add_argument("--small", action="store_true", help="small shapes (always on CPU)")
    # bench, profile and demo parse their own arguments (main() hands them over before argparse);
    # registered here so that argparse knows the names
    for name in ("bench", "profile", "demo"):
        sub.add_parser(name, add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # these take their own options (--a, --device, ...), which argparse would try to read
    own = {"bench": _cmd_bench, "profile": _cmd_profile, "demo": _cmd_demo}
    if argv[:1] and argv[0] in own:
        return own[argv[0]](argv[1:])
    p = parser()
    if not argv:
        p.print_help(sys.stderr)
        return 2
    args = p.parse_args(argv)
    return {"env": _cmd_env, "check": _cmd_check}[args.cmd](args)


def cli(argv=None) -> int:
    """``main`` for a terminal: a missing optional package is one line naming its install line, and
    a reader that closes the pipe early (``| head``) ends the command quietly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = main(argv)
        sys.stdout.flush()
        return rc
    except ModuleNotFoundError as e:
        from ._optional import missing_message
        msg = missing_message(e, f"{PROG} {argv[0] if argv else ''}".rstrip())
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader is gone: nothing more to say, and Python's own flush at exit must not fail
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(cli())
