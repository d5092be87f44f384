"""CLI of the 'ui' stage: `dsft ui [--runs DIR] [--host 127.0.0.1] [--port 7860] [--token T]`."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  dsft ui                                  # http://127.0.0.1:7860 over ./runs (loopback only)
  dsft ui --runs /data/runs --port 8080
  dsft ui --host 0.0.0.0                   # reachable from the network: prints a URL with a random token
  DSFT_UI_TOKEN=secret dsft ui --host 0.0.0.0
"""


def register(sub) -> None:
    p = sub.add_parser("ui", help="local web dashboard: runs, live curves, reports, launch/stop/resume, chat",
                       description="Serve a web dashboard over a runs directory: each run's plan, data report, live "
                                   "training curves, eval and quantization reports, exports and config; a validated "
                                   "form and YAML editor to launch `dsft run`; stop/resume; compare; chat.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs", metavar="DIR", help="the runs directory (default: ./runs)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("--token", help="access token (default: $DSFT_UI_TOKEN; off loopback a random one if unset)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from dsft.ui.stage import serve_dashboard

    serve_dashboard(args.runs, host=args.host, port=args.port, token=args.token)
    return 0
