"""The real NGINX with the shipped site file, rendered onto loopback ports, for the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx

from gguf_appliance.install import InstallPlan, rendered_files
from gguf_appliance.resources import static_dir

from .conftest import wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

MAIN_CONF = """\
user root;
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # As Debian's nginx.conf can: gzip on for everything. The site must still not gzip streams.
    gzip on;
    gzip_types text/event-stream application/json text/plain;
    include {tmp}/nginx/sites-enabled/*;
}}
"""


def render_site(tmp: Path, listen: str, upstream: str, lb_subnet: str) -> Path:
    """The shipped site and proxy files, filled in for a test; returns the main config."""
    plan = InstallPlan(
        bin_dir=Path("/usr/bin"),
        static_dir=static_dir(),
        listen=listen,
        upstream=upstream,
        lb_subnet=lb_subnet,
        nginx_dir=tmp / "nginx",
    )
    for path, text in rendered_files(plan).items():
        if path.is_relative_to(tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    enabled = tmp / "nginx/sites-enabled"
    enabled.mkdir(parents=True, exist_ok=True)
    (enabled / "gguf-appliance").symlink_to(tmp / "nginx/sites-available/gguf-appliance")
    conf = tmp / "nginx.conf"
    conf.write_text(MAIN_CONF.format(tmp=tmp))
    return conf


def check_config(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NGINX, "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True
    )


class RunningNginx:
    def __init__(self, conf: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.conf = conf
        self.process = subprocess.Popen(
            [NGINX, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(self._answers, 10, f"nginx never answered on {self.url}")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            httpx.get(self.url + "/", timeout=1)
            return True
        except httpx.TransportError:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx did not start: {self.process.stderr.read()}") from None
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
