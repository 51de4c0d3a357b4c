"""`stalwart up` and `stalwart down`: the background cluster on this machine, and only it."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from stalwart.cli.common import JsonOpt, app, console, err, fail, print_json, say
from stalwart.errors import StalwartError


@app.command()
def up(num_cpus: Optional[int] = typer.Option(None, help="CPUs to offer (default: all)"),
       num_gpus: Optional[int] = typer.Option(None, help="GPUs to offer (default: all)"),
       host: str = typer.Option("127.0.0.1", "--host", help="address to bind Ray and its dashboard to; another "
                                "machine's nodes and clients need this machine's own address here"),
       port: Optional[int] = typer.Option(None, "--port", help="Ray's (GCS) port (default: a free one)"),
       dashboard_port: Optional[int] = typer.Option(None, "--dashboard-port", help="default 8265, if free"),
       api: bool = typer.Option(True, "--api/--no-api", help="serve the REST API too (see `stalwart serve`)"),
       api_host: str = typer.Option("127.0.0.1", "--api-host", help="address the REST API listens on; anything "
                                    "but loopback must be asked for here, and wants --tls-cert/--tls-key"),
       api_port: int = typer.Option(8642, "--api-port", envvar="STALWART_API_PORT", help="the REST API's port"),
       tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="serve the API over HTTPS (PEM certificate)"),
       tls_key: Optional[str] = typer.Option(None, "--tls-key", help="the certificate's private key (PEM)"),
       as_json: bool = JsonOpt):
    """Start a Ray head (token auth and dashboard on), the controller and the REST API, in the background."""
    from stalwart.cli.serve import start_api
    from stalwart.client import Client
    from stalwart.orchestrator import cluster

    if api and (tls_cert is None) != (tls_key is None):
        fail("give both --tls-cert and --tls-key, or neither")
    home = cluster.home_dir()
    record = cluster.local_cluster(home)
    started = record is None
    if started:
        say("starting a Ray head in the background ...")
        try:
            record = cluster.start_background(home, num_cpus=num_cpus, num_gpus=num_gpus, host=host, port=port,
                                              dashboard_port=dashboard_port)
        except StalwartError as exc:
            fail(str(exc))
    else:
        say(f"a cluster started by `stalwart up` already runs at {record['address']}")
    try:
        client = Client(record["address"], home=home, start="never", say=say)
    except StalwartError as exc:
        if started:
            cluster.stop_background(home)  # a start that cannot be used leaves nothing running
        fail(f"{exc}{' (the new cluster was stopped again)' if started else ''}")
    address = record["address"]
    loopback = record.get("host", host) in ("127.0.0.1", "localhost", "::1")
    api_line = "not started (--no-api); `stalwart serve` starts it"
    api_started = False
    if api:
        try:
            api_line = start_api(client.controller_info["home"], api_host, api_port, tls_cert, tls_key)
            api_started = True
        except StalwartError as exc:  # the cluster is up and usable without it: say so, and how to fix it
            api_line = "not started"
            err.print(f"[yellow]warning: the REST API did not start: {escape(str(exc))}; the cluster runs without "
                      f"it (`stalwart serve --port PORT` starts it)[/]", highlight=False)
    if as_json:
        print_json({"address": address, "dashboard": record.get("dashboard"), "started": started,
                    "home": client.controller_info["home"], "api": api_line.split()[0] if api_started else None})
        client.close()
        return
    console.print(
        f"stalwart is up: Ray at {address}, controller ready (state in {client.controller_info['home']}).\n"
        f"  dashboard    {record.get('dashboard', '-')}   (`ray status`, `ray job` work here too)\n"
        f"  submit       stalwart submit job.yaml   (elsewhere: --address {address}, or RAY_ADDRESS)\n"
        f"  REST API     {api_line}\n"
        f"  more nodes   on each other machine, with this machine's Ray token in ~/.ray/auth_token there\n"
        f"               (`ray get-auth-token` prints it): RAY_AUTH_MODE=token ray start --address={address}\n"
        + ("               (Ray listens on 127.0.0.1 only: `stalwart up --host <this machine's address>` "
           "to take other machines)\n" if loopback else "")
        + "  stop         stalwart down", highlight=False, markup=False, soft_wrap=True)
    client.close()


@app.command()
def down(as_json: bool = JsonOpt):
    """Cancel running jobs and stop the cluster that `stalwart up` started here, and nothing else."""
    from stalwart.client import Client
    from stalwart.orchestrator import cluster

    home = cluster.home_dir()
    record = cluster.local_cluster(home)
    if record is None:
        stopped = cluster.stop_background(home)  # a record whose head no longer answers: end its leftovers
        if as_json:
            print_json({"stopped": None, "cancelled": [], "leftovers_stopped": bool(stopped)})
            return
        console.print("stopped the leftovers of a cluster whose head had gone" if stopped else
                      f"no cluster started by `stalwart up` is running (state dir {home})")
        return
    ids: list[str] = []
    try:
        client = Client(record["address"], home=home, start="never")
        ids = client.cancel_all("the cluster is going down (`stalwart down`)")
        if ids and not as_json:
            console.print(f"cancelled {len(ids)} job(s): {', '.join(ids)}")
        client.close()
    except StalwartError as exc:
        err.print(f"[yellow]could not reach the controller ({escape(str(exc))}); stopping the cluster anyway[/]")
    cluster.stop_background(home)
    if as_json:
        print_json({"stopped": record["address"], "cancelled": ids, "leftovers_stopped": False})
    else:
        console.print(f"stopped the cluster at {record['address']}")
