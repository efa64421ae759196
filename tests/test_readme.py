"""The README's promises that a script can check."""

from tests.helpers import ROOT


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command
    assert ci_command in readme.split("```")[1], "the README's first code block must hold .ci/run's command"
