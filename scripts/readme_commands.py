"""Print the README's two commands, one per line, exactly as printed there: the command lines (not the
comments) of its first ```bash block. CI (.ci/run) runs what this prints, so CI and the README cannot
drift apart.

    python scripts/readme_commands.py [README.md]
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands(readme: pathlib.Path = ROOT / "README.md") -> list[str]:
    """The non-comment, non-blank lines of the first ```bash block; exactly two, else ValueError."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index("```bash") + 1
        end = lines.index("```", start)
    except ValueError:
        raise ValueError(f"{readme}: no ```bash block closed by ``` (the block of the two commands)") from None
    commands = [line for line in lines[start:end] if line.strip() and not line.lstrip().startswith("#")]
    if len(commands) != 2:
        raise ValueError(f"{readme}: the first ```bash block must hold exactly two commands (set up and run the "
                         f"main job; set up and run the tests), found {len(commands)}: {commands}")
    return commands


if __name__ == "__main__":
    print("\n".join(readme_commands(*(pathlib.Path(a) for a in sys.argv[1:]))))
