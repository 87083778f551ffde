"""Every CLI option of every command maps onto a field of that command's typed config, and its default is
the config's default (config.py is the only place defaults live); every command has the shape
`run(cfg, rd, *, force)` and takes --config and --set."""

from __future__ import annotations

import inspect

import pytest
import typer

from sparse_recover import cli, config

# (CLI command, config class, option -> dotted field)
COMMANDS = {
    "prune": (config.PruneConfig, cli.PRUNE_FIELDS),
    "dsnot": (config.DsnotConfig, cli.DSNOT_FIELDS),
    "reconstruct": (config.ReconstructConfig, cli.RECONSTRUCT_FIELDS),
    "finetune": (config.FinetuneConfig, cli.FINETUNE_FIELDS),
    "merge": (config.MergeConfig, cli.MERGE_FIELDS),
    "audit": (config.AuditConfig, cli.AUDIT_FIELDS),
    "eval": (config.EvalCommandConfig, cli.EVAL_FIELDS),
    "report": (config.ReportConfig, cli.REPORT_FIELDS),
    "run": (config.RunConfig, cli.RUN_FIELDS),
}
# options that say where or how to run, not what: the run directory, the config layers, --force
STRUCTURAL = {"run_dir", "config", "set_", "force"}


def _command(name: str):
    group = typer.main.get_command(cli.app)
    return group.commands[name]


def test_the_table_covers_every_command():
    assert set(COMMANDS) == set(typer.main.get_command(cli.app).commands)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_maps_onto_a_config_field_with_the_same_default(name):
    cls, fields = COMMANDS[name]
    for param in _command(name).params:
        if param.name in STRUCTURAL:
            continue
        assert param.name in fields, f"{name}: option {param.opts} maps onto no config field"
        field = cli._field(cls, fields[param.name])
        got = param.default
        if field.is_required():  # given on the command line or in the --config file
            assert got is None or param.required, f"{name}: {param.opts} has a default the config lacks"
            continue
        want = field.get_default(call_default_factory=True)
        if getattr(param, "multiple", False):  # a repeatable option: none given = the field's default
            got = list(got or []) or None
        elif isinstance(want, list):  # a comma-separated option
            want = ",".join(want)
        assert got == want, f"{name}: {param.opts} defaults to {got!r}, the config field to {want!r}"
    for param in fields:
        assert param in {p.name for p in _command(name).params}, f"{name}: {param} is not an option"


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"run"}))
def test_every_command_takes_config_and_set(name):
    names = {p.name for p in _command(name).params}
    assert {"config", "set_"} <= names


@pytest.mark.parametrize("module", ["prune", "dsnot", "reconstruct", "finetune", "merge", "audit", "evaluate", "report", "run"])
def test_command_signature_shape(module):
    import importlib

    fn = importlib.import_module(f"sparse_recover.commands.{module}").run
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params] == ["cfg", "rd", "force"]
    assert params[2].kind is inspect.Parameter.KEYWORD_ONLY and params[2].default is False


def test_version_flag(capsys):
    from sparse_recover import __version__

    cli.main(["--version"])  # exit status 0: main returns normally
    assert capsys.readouterr().out.strip() == f"sparse-recover {__version__}"
