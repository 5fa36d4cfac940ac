"""The ``lsuv-pipeline`` command line: parse options, call one library function, print.

Every user mistake ends as one line ``Error: ...`` on stderr and a non-zero exit; a
traceback means a bug.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from .. import allocator
from ..errors import ConfigError, Interrupted, LsuvError, OffTarget
from .common import CLOSED_PIPE, OFF_TARGET, UsageMistake, print_result
from .compute import compute
from .inspect import export, show, verify

__all__ = ["CLOSED_PIPE", "OFF_TARGET", "cli", "main"]


class _Group(click.Group):
    """A group that reports every error as one line, without a usage banner or traceback.

    Exit statuses: 0 done; 1 a failed job (missing data, a damaged store, a lost cluster,
    ...); 2 a usage mistake (an unknown option, dataset, split or model name); 3 a run or
    verification whose layers miss the tolerance; 130 interrupted (Ctrl-C); 141 stdout
    closed early (``| head``).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OffTarget as exc:
            if exc.result is not None:
                print_result(ctx, exc.result, summary=False)
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(OFF_TARGET)
        except Interrupted as exc:
            click.echo(f"Interrupted: {exc}", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            _close_stdout()
            ctx.exit(CLOSED_PIPE)
        except ConfigError as exc:
            path = " ".join(filter(None, [ctx.command_path, ctx.invoked_subcommand]))
            raise UsageMistake(f"{exc} (see '{path} --help')") from None
        except LsuvError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lsuv-pipeline")
def cli() -> None:
    """Exact, full-dataset LSUV initialization (Mishkin & Matas 2015), stored in Zarr."""


for _command in (compute, show, verify, export):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    allocator.tune()  # this process is ours: keep freed batch memory mapped
    # This process reports cluster failures itself, once; dask's threads may still log
    # after a run ended (a client reconnecting to a scheduler that is gone).
    logging.getLogger("distributed").addFilter(lambda record: False)
    for name in ("distributed.client", "distributed.comm", "distributed.core"):
        logging.getLogger(name).addFilter(lambda record: False)
    try:
        cli()
    except BrokenPipeError:  # while flushing at the end
        _close_stdout()
        sys.exit(CLOSED_PIPE)


def _close_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone (``| head``), and nothing printed
    later, or flushed at exit, should end in a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
