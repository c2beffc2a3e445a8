"""The README's test command is what CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, "README must give exactly two set-up commands"
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines


def test_readme_says_how_to_get_uv_before_the_two_commands():
    """The two commands need uv; a fresh machine with only Python must learn how to get it
    before the first command fails with "uv: command not found"."""
    readme = (REPO / "README.md").read_text()
    before = readme[:readme.index("```bash")].rstrip()
    intro = before[before.rindex("\n\n"):]  # the paragraph right above the commands
    assert "pip install uv" in intro
    assert (REPO / ".ci" / "run").read_text().count("pip install --quiet uv") == 1


def test_ruff_finds_nothing():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout


def test_readme_config_reference_is_current():
    from tune_train.config import config_reference_markdown

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->\n")[1].split(
        "<!-- config-reference:end -->")[0]
    assert block == config_reference_markdown(), (
        "README's config reference is stale; regenerate it from "
        "tune_train.config.config_reference_markdown()")
