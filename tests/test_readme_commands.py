"""CI runs the README's two commands as printed: .ci/run takes them from scripts/readme_commands.py,
which reads them from README.md, so the two cannot drift apart."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from readme_commands import readme_commands  # noqa: E402


def test_the_readme_starts_with_its_two_commands():
    setup_and_run, setup_and_test = readme_commands()
    assert setup_and_run == "bash scripts/setup.sh && python -m sparse_ops run"
    assert setup_and_test == "bash scripts/test.sh"
    for command in (setup_and_run, setup_and_test):
        for script in re.findall(r"scripts/\S+", command):
            assert (ROOT / script).is_file(), script


def test_ci_runs_the_commands_it_reads_from_the_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mapfile -t README_COMMANDS < <(python3 scripts/readme_commands.py)" in ci
    run_lines = [line.strip() for line in ci.splitlines() if line.strip().startswith("bash -c")]
    assert run_lines == ['bash -c "${README_COMMANDS[1]}"', 'bash -c "${README_COMMANDS[0]} --steps 12"']
    for command in readme_commands():  # no copy of a command that could go stale
        assert command not in ci


@pytest.mark.parametrize("block,found", [("```bash\n# only a comment\nbash a.sh\n```", 1),
                                         ("```bash\nbash a.sh\nbash b.sh\nbash c.sh\n```", 3)])
def test_a_readme_without_exactly_two_commands_is_refused(tmp_path, block, found):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{block}\n")
    with pytest.raises(ValueError, match=f"exactly two commands .*found {found}"):
        readme_commands(readme)


def test_a_readme_without_a_bash_block_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n```sh\nbash a.sh\n```\n")
    with pytest.raises(ValueError, match="no ```bash block"):
        readme_commands(readme)
