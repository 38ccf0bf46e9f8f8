"""`decider serve`, `decider check-config`, and the operator commands `decider endpoints` and
`decider decide` (decider.cli.tools); `python -m decider` is the same program."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from decider import __version__, config
from decider.cli import tools, workers
from decider.config.tls import CertificateFiles
from decider.errors import ConfigError
from decider.obs import logs
from decider.runtime import event_loop

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decider", description="Routing decisions for LLM gateways over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"decider {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve DeciderService and RegistryService")
    serve.add_argument("--config", help="TOML config file (default: $DECIDER_CONFIG, or none)")
    serve.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:50051)")
    serve.add_argument(
        "--admin-token",
        help="bearer token RegistryService calls must present (prefer --admin-token-file)",
    )
    serve.add_argument(
        "--admin-token-file",
        metavar="PATH",
        help="file holding the admin token, so it is not in argv or the environment",
    )
    serve.add_argument("--tls-cert-file", metavar="PATH", help="server certificate (PEM): TLS on")
    serve.add_argument("--tls-key-file", metavar="PATH", help="private key of --tls-cert-file")
    serve.add_argument(
        "--tls-client-ca-file",
        metavar="PATH",
        help="CA bundle (PEM) client certificates must chain to: mTLS on",
    )
    serve.add_argument("--data-dir", help="directory for the registry store ('' = in memory)")
    serve.add_argument("--grace-period-s", type=float, help="drain time after SIGTERM")
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics on this address (default: none)",
    )
    serve.add_argument(
        "--log-level", help="debug, info (default), warning or error; logs are JSON lines"
    )
    serve.add_argument(
        "--log-decisions",
        action="store_true",
        default=None,
        help="log one line per Decide (off by default)",
    )
    serve.add_argument(
        "--ext-proc-listen",
        metavar="HOST:PORT",
        help="serve Envoy's ext_proc endpoint-picker protocol on this address (docs/ENVOY.md)",
    )
    serve.add_argument(
        "--ext-proc-single-endpoint",
        action="store_true",
        default=None,
        help="name only the chosen endpoint, no fallbacks (for an ORIGINAL_DST cluster)",
    )
    serve.add_argument(
        "--port-file",
        metavar="PATH",
        help="once serving, write the bound port to PATH (useful with --listen HOST:0)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve with N processes on one port (SO_REUSEPORT); needs [state] backend = redis",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="serve the embedded example with local stand-in model servers (make run)",
    )

    check = sub.add_parser("check-config", help="validate a config file without serving")
    check.add_argument("file")
    tools.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command in tools.COMMANDS:
            return tools.run(args)
        return _serve(args, argv)
    except ConfigError as exc:
        print(f"decider: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _check_config(path: str) -> int:
    # The DECIDER_* variables count as they do for `serve`, so "ok" means serve would start.
    settings = config.load(path, env=os.environ)
    if settings.server.tls.enabled:
        CertificateFiles(settings.server.tls)  # reads and checks the files, as serve does
    print(
        f"{path}: ok ({len(settings.endpoints)} endpoints, "
        f"listen {settings.server.listen}, "
        f"default strategy {settings.engine.routing.default_strategy})"
    )
    return 0


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    flags: dict[str, Any] = {
        "listen": args.listen,
        "admin_token": args.admin_token,
        "admin_token_file": args.admin_token_file,
        "tls_cert_file": args.tls_cert_file,
        "tls_key_file": args.tls_key_file,
        "tls_client_ca_file": args.tls_client_ca_file,
        "data_dir": args.data_dir,
        "grace_period_s": args.grace_period_s,
        "metrics_listen": args.metrics_listen,
        "log_level": args.log_level,
        "log_decisions": args.log_decisions,
        "ext_proc_listen": args.ext_proc_listen,
        "ext_proc_single_endpoint": args.ext_proc_single_endpoint,
    }
    path = args.config or os.environ.get("DECIDER_CONFIG") or None
    if args.demo and args.port_file:
        raise ConfigError("flag --port-file: not supported with --demo")
    if args.demo:
        from decider.runtime import demo

        settings = demo.load_settings(path, env=os.environ, flags=flags)
    else:
        settings = config.load(path, env=os.environ, flags=flags)
    workers.check(args.workers, settings, demo=args.demo)
    # A bad OTEL_* value is a configuration error like any other: exit 2 before serving.
    from decider.obs.telemetry import Tracing

    tracing = Tracing.from_env(os.environ, install_global=True)
    _setup_logging(settings)
    logs.log_event(logs.CONFIG, "tracing", tracing.settings.describe())
    if args.demo:
        event_loop.run(demo.run(settings, tracing=tracing), event_loop=settings.server.event_loop)
        return 0
    if args.workers > 1:
        return workers.supervise(argv, settings, workers=args.workers, port_file=args.port_file)
    from decider.runtime.server import serve

    on_ready = None
    if args.port_file:
        port_file = args.port_file
        on_ready = lambda server: _write_port_file(port_file, server.port)  # noqa: E731
    event_loop.run(
        serve(
            settings,
            tracing=tracing,
            on_ready=on_ready,
            reuse_port=args.worker_index is not None,
        ),
        event_loop=settings.server.event_loop,
    )
    return 0


def _write_port_file(path: str, port: int) -> None:
    """Written whole then renamed, so a reader never sees a partial number."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(f"{port}\n")
    os.replace(partial, path)


def _setup_logging(settings: config.Settings) -> None:
    srv = settings.server
    logs.configure_logging(level=srv.log_level, log_decisions=srv.log_decisions)
    logs.log_config_loaded(
        None if settings.source == "<defaults>" else settings.source,
        fields={
            "listen": srv.listen,
            "endpoints": len(settings.endpoints),
            "default_strategy": settings.engine.routing.default_strategy,
            "metrics_listen": srv.metrics_listen,
            "log_decisions": srv.log_decisions,
            "admin_token_set": bool(srv.admin_token),
            "admin_token_file": srv.admin_token_file,
            "tls": bool(srv.tls.enabled),
            "mtls": bool(srv.tls.mutual),
        },
    )
