"""The `mirror` command: argparse sub-commands, each a thin call into the modules below.

Every sub-command takes `--config` before or after its name (`mirror --config F gc` and
`mirror gc --config F` are one command), and a one-line help in `mirror --help` plus a
description in its own `--help`.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import sys
from collections.abc import Callable, Mapping

from . import config as cfg

ACCESS_LOG = '%a "%r" %s %b %Tfs "%{User-Agent}i"'
CACHE_COMMANDS = ("prefetch", "export", "import", "ls", "du")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)

    environ: Mapping[str, str] = os.environ
    if getattr(args, "listen", None) is not None:  # the flag wins over the file and env
        environ = {**os.environ, "MIRROR_SERVER_LISTEN": args.listen}
    try:
        config = cfg.load(args.config, environ)
    except cfg.ConfigError as e:
        given = " (given by --listen)" if environ is not os.environ and "server.listen" in str(e) \
            else ""
        sys.exit(f"mirror: config error: {e}{given}")
    if config.storage.backend != "filesystem" and args.command in (*CACHE_COMMANDS, "gc",
                                                                     "verify"):
        sys.exit(f"mirror: `mirror {args.command}` works on the filesystem backend only; this "
                 f"config has storage.backend = \"{config.storage.backend}\" (a cluster). Run it "
                 "with a config for a single node, or use the registry API of a replica")
    if args.command == "serve":
        _serve(config)
    elif args.command == "user":
        _user_add(config, args)
    elif args.command == "tls":
        _tls_init(config, args)
    elif args.command in CACHE_COMMANDS:
        sys.exit(_cache_command(config, args))
    elif args.command in ("gc", "verify"):
        sys.exit(_housekeeping(config, args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror", description="Pull-through caching mirror and private registry.")
    parser.add_argument("--config", metavar="PATH", default=os.environ.get("MIRROR_CONFIG"),
                        help="TOML config file (default: $MIRROR_CONFIG, else embedded "
                             "defaults: 0.0.0.0:5000, ./data, Docker Hub and friends); "
                             "may also follow the command")
    parser.add_argument("--version", action="version", version=f"mirror {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group: argparse._SubParsersAction, name: str, summary: str,
                details: str = "") -> argparse.ArgumentParser:
        """A sub-command: its one line in the list, and --help's description. Every one
        takes --config after its name too (`mirror gc --config F`), like before it."""
        sub = group.add_parser(name, help=summary,
                               description=f"{summary[0].upper()}{summary[1:]}. {details}".strip())
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                         help="TOML config file (may also come before the command)")
        return sub

    serve = command(commands, "serve", "run the registry mirror",
                    "Serves the registry API on server.listen (HTTP, or HTTPS with "
                    "server.tls_certificate), pulling through the configured upstreams and "
                    "hosting what clients push; stops on SIGINT or SIGTERM.")
    serve.add_argument("--listen", metavar="HOST:PORT",
                       help="the address to listen on, overriding server.listen and "
                            "MIRROR_SERVER_LISTEN (e.g. 127.0.0.1:5000, [::]:5000)")

    user = commands.add_parser("user", help="manage the htpasswd file of client logins",
                               description="Manage the htpasswd file of client logins.")
    user_commands = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = command(user_commands, "add", "add a user, or set a user's password",
                  "Writes a bcrypt entry; the password is asked on the terminal twice, or "
                  "read from standard input with --password-stdin.")
    add.add_argument("name")
    add.add_argument("--htpasswd", metavar="PATH",
                     help="the file to change (default: access.htpasswd of the config)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input instead of prompting")

    tls = commands.add_parser("tls", help="certificates for serving HTTPS",
                              description="Certificates for serving HTTPS.")
    tls_commands = tls.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = command(tls_commands, "init", "create a private CA and a server certificate",
                   "Run again with more --host names to add them: the CA in DIR is kept "
                   "(clients trust it) and a new server certificate covers the old names and "
                   "the new ones.")
    init.add_argument("--host", action="append", required=True, metavar="NAME",
                      help="a DNS name or IP address clients use for the mirror (repeatable)")
    init.add_argument("--dir", metavar="DIR",
                      help="where to write them (default: <storage.root>/tls)")
    init.add_argument("--ca-name", metavar="NAME",
                      help="the new CA's name, as clients show it (default: mirror CA "
                           "<this host's name>)")
    _add_cache_commands(commands, command)
    gc = command(commands, "gc", "remove expired uploads, abandoned spools and blobs nothing "
                                 "refers to",
                 "Safe while the mirror runs: what a live server is writing is kept, and a "
                 "blob is removed only through the same check the cache budget uses.")
    gc.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                    help="keep unreferenced blobs used more recently than this (default 3600)")
    command(commands, "verify", "re-hash every stored blob; quarantine bad ones",
            "A bad blob is moved to <storage.root>/quarantine/. A cached one is fetched "
            "again by the next pull; a pushed one is lost, and the hosted images that need "
            "it are named, to be pushed again. Exits 1 when a blob was bad.")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mirror")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _user_add(config: cfg.Config, args: argparse.Namespace) -> None:
    from .api.htpasswd import add_user

    path = args.htpasswd or config.access.htpasswd
    if not path:
        sys.exit("mirror: no htpasswd file: pass --htpasswd PATH or set access.htpasswd")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif not sys.stdin.isatty():
        sys.exit("mirror: no terminal to ask for the password on; pipe it in with "
                 f"--password-stdin (printf '%s\\n' \"$PASSWORD\" | mirror user add "
                 f"{args.name} --password-stdin)")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            sys.exit("mirror: the passwords differ; nothing changed")
    if not password:
        sys.exit("mirror: an empty password is not allowed")
    try:
        new = add_user(path, args.name, password)
    except (OSError, ValueError, cfg.ConfigError) as e:
        sys.exit(f"mirror: {e}")
    print(f"{'added' if new else 'changed the password of'} {args.name} in {path}")


def _tls_init(config: cfg.Config, args: argparse.Namespace) -> None:
    from pathlib import Path

    from .ops.certs import CertificateError, client_instructions, init

    directory = Path(args.dir or os.path.join(config.storage.root, "tls"))
    try:
        issued = init(directory, args.host, args.ca_name)
    except CertificateError as e:
        sys.exit(f"mirror: {e}")
    except OSError as e:
        sys.exit(f"mirror: cannot write to {directory}: {e.strerror or e}")
    print(client_instructions(issued, config.server.port))


def _housekeeping(config: cfg.Config, args: argparse.Namespace) -> int:
    import asyncio

    from .ops import housekeeping
    from .ops.local import CommandError, human_size

    try:
        if args.command == "gc":
            report = asyncio.run(housekeeping.gc(config, args.grace))
            print(f"checked {report.checked} blobs; removed {report.removed} files, "
                  f"{human_size(report.removed_bytes)}")
            return 0
        report = asyncio.run(housekeeping.verify(config, housekeeping.terminal_progress))
    except CommandError as e:
        print(f"mirror: {e}", file=sys.stderr)
        return 1
    quarantine = f"{config.storage.root}/quarantine/"
    for digest in report.bad:
        pushed = ", ".join(report.pushed.get(digest, []))
        if not pushed:
            print(f"BAD {digest}: moved to {quarantine}; the next pull fetches it again")
        elif digest in report.cached:  # one file for both: the cached image's pull mends it
            print(f"BAD {digest}: moved to {quarantine}; the next pull of a cached image that "
                  f"has it fetches it again, which also mends the hosted {pushed}")
        else:
            print(f"BAD {digest}: moved to {quarantine}; it was pushed here and no upstream "
                  f"has it, so it is lost: {pushed} cannot be pulled until pushed again "
                  "(only the missing blob is uploaded)")
    print(f"verified {report.checked} blobs: {report.checked - len(report.bad)} good, "
          f"{len(report.bad)} bad")
    return 1 if report.bad else 0


def _add_cache_commands(commands: argparse._SubParsersAction,
                        make: Callable[..., argparse.ArgumentParser]) -> None:
    """prefetch, export, import, ls, du: the operator's view of the cache."""

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return make(commands, name, summary)

    prefetch = command("prefetch", "pull images through the running mirror into its cache")
    prefetch.add_argument("images", nargs="*", metavar="IMAGE",
                          help="as a client pulls it from the mirror: alpine:3.19, "
                               "quay.io/coreos/etcd:v3.5, library/alpine@sha256:...")
    prefetch.add_argument("--file", metavar="LIST", help="more images, one per line")
    prefetch.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                          help="of an index, only this platform (default: all)")
    prefetch.add_argument("--pin", action="store_true",
                          help="never evict these images (needs this mirror's storage.root)")
    prefetch.add_argument("--mirror", metavar="URL",
                          help="the mirror to pull through (default: http://127.0.0.1:<port "
                               "of server.listen>)")
    prefetch.add_argument("--jobs", type=int, default=4, metavar="N",
                          help="requests in flight (default: 4)")

    export = command("export", "write cached or pushed images to an OCI image layout tar")
    export.add_argument("images", nargs="+", metavar="IMAGE")
    export.add_argument("-o", "--output", required=True, metavar="BUNDLE.tar")

    load = command("import", "load an OCI image layout tar into the cache (pushed images "
                             "into hosted repositories)")
    load.add_argument("bundle", metavar="BUNDLE.tar")

    for name, summary in (("ls", "list cached and hosted repositories, tags, sizes, last use"),
                       ("du", "disk use: cached, hosted, budget, largest repositories")):
        command(name, summary).add_argument("--json", action="store_true",
                                         help="machine-readable output")


def _cache_command(config: cfg.Config, args: argparse.Namespace) -> int:
    from .ops.local import CommandError

    try:
        if args.command == "prefetch":
            from .ops import prefetch

            images = args.images + (prefetch.read_list(args.file) if args.file else [])
            return prefetch.run(config, images, args.platform, args.pin, args.mirror, args.jobs)
        if args.command == "export":
            from .ops.bundle import export

            return export(config, args.images, args.output)
        if args.command == "import":
            from .ops.unbundle import import_bundle

            return import_bundle(config, args.bundle)
        from .ops import inventory

        return (inventory.ls if args.command == "ls" else inventory.du)(config, args.json)
    except CommandError as e:
        print(f"mirror: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve(config: cfg.Config) -> None:
    from aiohttp import web

    from . import logs
    from .app import make_app, ssl_context
    from .errors import StorageError

    access_log_class = logs.setup(config.server.log_format)
    access_log = logging.getLogger("aiohttp.access") if config.server.access_log else None
    if config.access.htpasswd is not None and not os.path.isfile(config.access.htpasswd):
        sys.exit(f"mirror: access.htpasswd: no such file {config.access.htpasswd} "
                 "(create it with: mirror user add NAME)")
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
    try:
        app = make_app(config)
    except cfg.ConfigError as e:  # an htpasswd entry refused at load, naming its line
        sys.exit(f"mirror: config error: {e}")
    try:
        web.run_app(app, host=config.server.host, port=config.server.port,
                    access_log=access_log, access_log_class=access_log_class,
                    access_log_format=ACCESS_LOG, ssl_context=tls, print=None)
    except StorageError as e:  # at start: the bucket or Redis of a cluster config
        sys.exit(f"mirror: cannot start: {e.message}")
    except OSError as e:  # the address: in use, or not this host's
        if e.errno == errno.EADDRINUSE:
            sys.exit(f"mirror: cannot listen on {config.server.listen}: the port is in use by "
                     "another process; stop it, or set server.listen (MIRROR_SERVER_LISTEN)")
        sys.exit(f"mirror: cannot listen on {config.server.listen}: {e.strerror or e}")
