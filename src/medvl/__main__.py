"""``python -m medvl``: the ``medvl`` command."""

from medvl.cli.launch import run

if __name__ == "__main__":
    run()
