"""The README's two copy-paste commands: CI runs the test one, and the main one runs the default recipe."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line.strip() == "```bash"]


def test_exactly_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main, tests = commands
    assert "recipes/distill.py" in main and main.rstrip().endswith("recipes/distill.py")  # the default config
    assert "pytest" in tests and "HF_HUB_OFFLINE=1" in main and "HF_HUB_OFFLINE=1" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
