"""CI installs and tests exactly as README.md tells a newcomer to."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_commands():
    readme = ROOT.joinpath("README.md").read_text()
    commands = [line for line in ROOT.joinpath(".ci", "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(commands) == 2
    for command in commands:
        assert f"```bash\n{command}\n```" in readme, command
