"""The command list is pinned (one file per command under sparse_recover/commands/)."""

from pathlib import Path

from sparse_recover.cli import app

COMMANDS = ["prune", "dsnot", "reconstruct", "finetune", "merge", "audit", "eval", "report", "run"]
FILES = {"eval": "evaluate"}


def test_command_list_is_pinned():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert names == COMMANDS
    folder = Path(__file__).resolve().parents[2] / "sparse_recover" / "commands"
    for name in COMMANDS:
        assert (folder / f"{FILES.get(name, name)}.py").is_file(), name
