"""A stand-in service for the launcher tests: `python -m fake_service --port 0 --ready-file F ...`.

It runs the real serving bootstrap (health, ready file, SIGTERM drain) with no servicer, so the
launcher's process handling is tested in seconds without loading models; the real services have
their own tests, and test_launcher's integration test runs `protege up` with them. Flags: --crash
(exit 3 at once), --hang (never become ready), --ignore-sigterm (only SIGKILL stops it). Other
flags are printed and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from protege import serving


async def serve(args: argparse.Namespace) -> None:
    opts = serving.ServerOptions(host=args.host, port=args.port, metrics_port=args.metrics_port,
                                 ready_file=args.ready_file)
    running = await serving.start_server("fake", opts, lambda server: None, [])
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        await running.wait()
    else:
        await serving.serve_until_signal(running, grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--ready-file")
    for flag in ("--crash", "--hang", "--ignore-sigterm"):
        parser.add_argument(flag, action="store_true")
    args, rest = parser.parse_known_args()
    print(f"fake service args: {sys.argv[1:]}", flush=True)
    if args.crash:
        print("fake crash: the scorer config is bad", flush=True)
        sys.exit(3)
    if args.hang:
        time.sleep(3600)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
