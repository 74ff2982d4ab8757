"""Running the ``medvl`` CLI in-process for tests (imported by the CLI test modules)."""

from typer.testing import CliRunner

from medvl.cli.main import app

runner = CliRunner()


def invoke(*args):
    """Run ``medvl ARGS``; returns the result and its stdout + stderr as one string."""
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")
