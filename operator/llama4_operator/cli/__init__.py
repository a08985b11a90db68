"""`llama4ctl`: plan expert placements, replay traces against autoscaling policies, run the local
control plane and demo. Each sub-command lives in its own module, imported only when that command
runs (or help lists it), so that `llama4ctl plan experts` does not pay for the operator's and the
demo's imports at start-up."""

from __future__ import annotations

import importlib

import click

from llama4_operator import __version__

# Command name -> (module, attribute) of the click command.
_COMMANDS = {
    "dev": ("llama4_operator.cli.dev", "dev"),
    "operator": ("llama4_operator.cli.operator_main", "operator_command"),
    "plan": ("llama4_operator.cli.plan", "plan"),
    "simulate": ("llama4_operator.cli.simulate", "simulate"),
}


class _LazyGroup(click.Group):
    """A group that imports a sub-command's module when the command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attribute = _COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llama4ctl")
def main() -> None:
    """Run Llama 4 mixture-of-experts models on Kubernetes GPU clusters."""
