"""`llama4ctl`: plan expert placements, replay traces against autoscaling policies, run the local
control plane and demo. Each sub-command lives in its own module and is registered here."""

import click

from llama4_operator import __version__
from llama4_operator.cli import dev, operator_main, plan, simulate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llama4ctl")
def main() -> None:
    """Run Llama 4 mixture-of-experts models on Kubernetes GPU clusters."""


main.add_command(dev.dev)
main.add_command(operator_main.operator_command)
main.add_command(plan.plan)
main.add_command(simulate.simulate)
