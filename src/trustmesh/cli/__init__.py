"""The ``trustmesh`` command line: one module per command group.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import click

from trustmesh import __version__
from trustmesh.errors import ConfigError, NotFoundError, PKIError, TrustmeshError
from trustmesh.logs import announce, reset_logging_format

__all__ = ["cli", "main"]

#: Errors caused by what the user gave us: exit code 2.
_INPUT_ERRORS = (ConfigError, PKIError, NotFoundError)


#: Command name -> (module, attribute). A command's module is imported when the command
#: runs (or help lists it): ``trustmesh proxy`` does not load the CA, the servers or rich.
_COMMANDS = {
    "ca": ("ca", "ca_group"),
    "issue": ("certs", "issue_command"),
    "sign": ("certs", "sign_command"),
    "revoke": ("certs", "revoke_command"),
    "list": ("certs", "list_command"),
    "crl": ("certs", "crl_command"),
    "inspect": ("inspection", "inspect_command"),
    "export": ("export", "export_group"),
    "audit": ("audit", "audit_group"),
    "token": ("token", "token_group"),
    "entry": ("entry", "entry_group"),
    "idp": ("idp", "idp_group"),
    "agent": ("agent", "agent_command"),
    "workload-agent": ("workload", "workload_agent_command"),
    "policy": ("policy", "policy_group"),
    "run": ("run", "run_command"),
    "gateway": ("gateway", "gateway_group"),
    "proxy": ("proxy", "proxy_group"),
    "acme": ("acme", "acme_group"),
}


class _LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None or cmd_name not in _COMMANDS:
            return found
        module, attribute = _COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(f".{module}", __name__), attribute)
        self.add_command(command, cmd_name)
        return command


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="trustmesh")
def cli() -> None:
    """trustmesh: short-lived SPIFFE identities and mutual TLS for microservices."""


def _error(message: str) -> None:
    # A server that set up JSON logs before failing closes with a JSON line too.
    announce(f"error: {message}", event="exit_error", level=logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (does not call :func:`sys.exit`)."""
    reset_logging_format()
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="trustmesh",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.UsageError as exc:
        # One line like every other refusal (click's own form is usage + hint + error).
        where = f" See '{exc.ctx.command_path} --help'." if exc.ctx is not None else ""
        _error(f"{exc.format_message()}{where}")
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except _INPUT_ERRORS as exc:
        _error(exc.message)
        return 2
    except TrustmeshError as exc:
        _error(exc.message)
        return 1
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        return 130
    # Without standalone mode click returns ctx.exit(n)'s code instead of raising.
    return result if isinstance(result, int) else 0


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
