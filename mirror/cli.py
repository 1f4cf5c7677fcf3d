"""The `mirror` command: argparse sub-commands, each a thin call into the modules below."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import config as cfg

ACCESS_LOG = '%a "%r" %s %b %Tfs "%{User-Agent}i"'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mirror", description="Pull-through caching mirror for container registries.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the registry mirror")
    serve.add_argument("--config", metavar="PATH", default=os.environ.get("MIRROR_CONFIG"),
                       help="TOML config file (default: $MIRROR_CONFIG, else embedded "
                            "defaults: 0.0.0.0:5000, ./data, Docker Hub and friends)")
    args = parser.parse_args(argv)

    try:
        config = cfg.load(args.config)
    except cfg.ConfigError as e:
        sys.exit(f"mirror: config error: {e}")
    if args.command == "serve":
        _serve(config)


def _serve(config: cfg.Config) -> None:
    from aiohttp import web

    from .app import make_app, ssl_context

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    access_log = logging.getLogger("aiohttp.access") if config.server.access_log else None
    root = config.storage.root
    try:
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"{root} is not writable by this user")
    except OSError as e:
        sys.exit(f"mirror: cannot use storage.root {root}: {e}")
    try:
        tls = ssl_context(config)
    except (OSError, ValueError) as e:
        sys.exit(f"mirror: cannot load server.tls_certificate / server.tls_key: {e}")
    web.run_app(make_app(config), host=config.server.host, port=config.server.port,
                access_log=access_log, access_log_format=ACCESS_LOG, ssl_context=tls, print=None)
