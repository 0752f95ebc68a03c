"""Command line: `python -m sparse_ops <command>`."""

import sys

COMMANDS = {"demo": "prune one real layer of all-MiniLM-L6-v2 with every method and report"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<8}{text}" for name, text in COMMANDS.items())
        print(f"usage: python -m sparse_ops <command> [options]\n\ncommands:\n{listing}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from . import demo

    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
