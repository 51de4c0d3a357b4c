"""`stalwart monitoring`: the Grafana dashboard and a Prometheus scrape config for the controller."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from stalwart.cli.common import AddressOpt, app, connect, fail
from stalwart.errors import StalwartError

monitoring_app = typer.Typer(no_args_is_help=True,
                             help="Prometheus and Grafana: the controller's scrape config and the dashboard.")
app.add_typer(monitoring_app, name="monitoring")

@monitoring_app.command("dashboard")
def monitoring_dashboard():
    """Print the Grafana dashboard (JSON): import it as-is and pick your Prometheus data source."""
    from importlib.resources import files

    sys.stdout.write(files("stalwart.monitoring").joinpath("dashboard.json").read_text())


@monitoring_app.command("prometheus-config")
def monitoring_prometheus_config(address: Optional[str] = AddressOpt,
                                 interval: str = typer.Option("15s", help="scrape interval")):
    """Print a Prometheus config that scrapes the controller's metrics endpoint."""
    from urllib.parse import urlparse

    client = connect(address, start="never")
    try:
        endpoint = client.metrics_endpoint()
    except StalwartError as exc:
        fail(str(exc))
    if not endpoint:
        fail("the controller serves no metrics endpoint (its port could not be bound; see the controller's log)")
    url = urlparse(endpoint)
    sys.stdout.write(
        f"# Prometheus scrape config for the stalwart controller's metrics at {endpoint}\n"
        f"# (bound to 127.0.0.1 on the controller's node: run Prometheus there, or forward the port).\n"
        f"# Use as prometheus.yml, or copy the job under scrape_configs into yours.\n"
        f"global:\n"
        f"  scrape_interval: {interval}\n"
        f"scrape_configs:\n"
        f"  - job_name: stalwart\n"
        f"    scrape_interval: {interval}\n"
        f"    metrics_path: {url.path or '/metrics'}\n"
        f"    static_configs:\n"
        f"      - targets: ['{url.netloc}']\n")

