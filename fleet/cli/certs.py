"""``fleet certs``: a small CA: the broker's TLS certificate, a client certificate per device."""

from __future__ import annotations

from pathlib import Path

import click

from fleet.cli.context import Env, pass_env


@click.group()
def certs() -> None:
    """A small CA: the broker's TLS certificate and one client certificate per device."""


pki_option = click.option(
    "--pki",
    type=click.Path(path_type=Path, file_okay=False),
    help="The CA directory (default: STATE_DIR/pki).",
)


@certs.command("init-ca")
@pki_option
@click.option("--cn", default="SparseFleet CA", show_default=True, help="The CA's name.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (invalidates its certs).")
@pass_env
def certs_init_ca(env: Env, pki: Path | None, cn: str, days: int, force: bool) -> None:
    """Create the CA (ca.crt, and ca.key mode 0600: keep it off the broker)."""
    from fleet.ops.certs import init_ca

    files = init_ca(pki or env.state_dir / "pki", cn=cn, days=days, overwrite=force)
    env.console.print(f"created CA {cn!r}: {files.cert_file} and {files.key_file}")


@certs.command("issue")
@click.argument("device_id", metavar="DEVICE")
@pki_option
@click.option("--days", type=click.IntRange(1, 36500), default=365, show_default=True)
@pass_env
def certs_issue(env: Env, device_id: str, pki: Path | None, days: int) -> None:
    """Issue DEVICE's client certificate (its CN is the device id)."""
    from fleet.ops.certs import issue

    files = issue(pki or env.state_dir / "pki", device_id, days=days)
    env.console.print(f"issued {device_id}: {files.cert_file} and {files.key_file} (mode 0600)")


@certs.command("server")
@click.argument("hosts", metavar="HOST...", nargs=-1, required=True)
@pki_option
@click.option("--days", type=click.IntRange(1, 36500), default=825, show_default=True)
@pass_env
def certs_server(env: Env, hosts: tuple[str, ...], pki: Path | None, days: int) -> None:
    """Issue the broker's TLS certificate for HOST names and IP addresses devices dial."""
    from fleet.ops.certs import issue_server

    files = issue_server(pki or env.state_dir / "pki", hosts=hosts, days=days)
    env.console.print(f"issued the server certificate: {files.cert_file} and {files.key_file}")
