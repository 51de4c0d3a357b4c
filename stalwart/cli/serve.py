"""`stalwart serve`: the REST API on the running cluster (`stalwart up` starts it as well)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stalwart.cli.common import AddressOpt, JsonOpt, app, console, err, fail, print_json, say
from stalwart.errors import StalwartError

HostOpt = typer.Option("127.0.0.1", "--host", help="address the API listens on; anything but loopback must be "
                       "asked for here, and wants --tls-cert/--tls-key")
PortOpt = typer.Option(8642, "--port", envvar="STALWART_API_PORT", help="the API's port")
CertOpt = typer.Option(None, "--tls-cert", help="serve HTTPS with this certificate (PEM, a path on the head node)")
KeyOpt = typer.Option(None, "--tls-key", help="the certificate's private key (PEM, a path on the head node)")


def start_api(controller_home: str, host: str, port: int, tls_cert: Optional[str], tls_key: Optional[str]) -> str:
    """Serve the API next to the connected cluster's controller; returns what to print about it.
    Raises StalwartError when it cannot start (its port is taken, a certificate cannot be loaded)."""
    from stalwart.api import protocol, server
    from stalwart.orchestrator import cluster

    if (tls_cert is None) != (tls_key is None):
        fail("give both --tls-cert and --tls-key, or neither")
    token, token_file = protocol.ensure_token(cluster.home_dir())
    settings = server.ApiSettings(host=host, port=port, token_digest=protocol.token_digest(token).hex(),
                                  tls_cert=str(Path(tls_cert).resolve()) if tls_cert else None,
                                  tls_key=str(Path(tls_key).resolve()) if tls_key else None,
                                  max_package_bytes=protocol.package_limit())
    if not protocol.is_loopback(host) and not tls_cert:
        err.print(f"[yellow]warning: the API listens on {host} without TLS: its token and the jobs' specs cross "
                  f"the network in clear; give --tls-cert and --tls-key[/]", highlight=False)
    info = server.start(controller_home, settings)
    where = f"token in {token_file}" if token_file else f"token from {protocol.TOKEN_ENV}"
    return f"{info['url']}   ({where}; `stalwart --server {info['url']} list`)"


@app.command()
def serve(host: str = HostOpt, port: int = PortOpt, tls_cert: Optional[str] = CertOpt,
          tls_key: Optional[str] = KeyOpt, address: Optional[str] = AddressOpt,
          stop: bool = typer.Option(False, "--stop", help="stop the API server instead"), as_json: bool = JsonOpt):
    """Serve the REST API on the running cluster, next to its controller, until `stalwart down`.

    It comes back by itself if its process dies. Run again with other options to change them."""
    from stalwart.api import server
    from stalwart.client import Client

    try:
        client = Client(address, start="never", say=say)
    except StalwartError as exc:
        fail(str(exc))
    try:
        if stop:
            stopped = server.stop()
            if as_json:
                print_json({"stopped": bool(stopped)})
            else:
                console.print("stopped the API server" if stopped else "no API server was running")
            return
        line = start_api(client.controller_info['home'], host, port, tls_cert, tls_key)
        if as_json:
            print_json({"url": line.split()[0]})
        else:
            console.print(f"the REST API serves at {line}", highlight=False, soft_wrap=True)
    except StalwartError as exc:
        fail(str(exc))
    finally:
        client.close()
