"""The `protege` command line: submit and follow jobs, check a reward service, run services locally.

    protege submit job.yaml --watch          # prints the job id, then a progress bar
    protege list | get ID | cancel ID | watch ID
    protege reward check 127.0.0.1:50053     # conformance checks for a reward service
    protege token new --scope jobs --token-out me.token >> tokens.yaml   # a server's tokens file
    protege token hash --scope reward < reward.token >> tokens.yaml
    protege up --endpoints-file ep.json      # all four services on 127.0.0.1, until Ctrl-C
    protege demo                             # the CPU demo (needs `pip install 'protege[server]'`)

Connection options (`--target`, `--token`, `--tls-ca`, ...) go before the command or, for the job
commands, after it; they default to $PROTEGE_TARGET, $PROTEGE_TOKEN and $PROTEGE_TLS_*. A server
error prints one line and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import secrets
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from protege import errors
from protege.client import DEFAULT_TARGET, TARGET_ENV, TOKEN_ENV, Client
from protege.serving import SCOPES, TLSConfig, hash_token, read_token_file
from protege.spec import (
    CheckpointEvent,
    EvalEvent,
    JobInfo,
    NoticeEvent,
    StateEvent,
    StepEvent,
)

app = typer.Typer(name="protege", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Protégé: online hybrid RL + imitation fine-tuning of LLMs.")
reward_app = typer.Typer(no_args_is_help=True, help="Tools for reward-service authors.")
app.add_typer(reward_app, name="reward")
token_app = typer.Typer(no_args_is_help=True,
                        help="Make bearer tokens and the hashed lines of servers' tokens files.")
app.add_typer(token_app, name="token")
# A salted SHA-256 protects random tokens; a shorter, chosen one could be guessed from its hash.
MIN_TOKEN_CHARS = 24


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where and how to reach a service: the global options, overridden per command."""

    target: str = DEFAULT_TARGET
    token: str | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    timeout: float = 30.0

    def tls_config(self) -> TLSConfig | None:
        if not (self.tls or self.tls_ca or self.tls_cert):
            return None
        s = lambda p: str(p) if p else None
        return TLSConfig(ca=s(self.tls_ca), cert=s(self.tls_cert), key=s(self.tls_key),
                         server_name=self.tls_server_name)

    def client(self) -> Client:
        # token="" (not None) so an unset --token does not fall back to the env a second time.
        return Client(self.target, token=self.token or "", tls=self.tls_config(),
                      timeout=self.timeout)


TargetOpt = Annotated[str | None, typer.Option(
    "--target", help="learner address host:port (overrides the global --target)")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="bearer token (overrides the global --token)")]
TlsCaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", help="PEM CA of the server's certificate; turns TLS on")]


def _connection(ctx: typer.Context, target: str | None = None, token: str | None = None,
                tls_ca: Path | None = None) -> Connection:
    base: Connection = ctx.find_root().obj or Connection()
    overrides = {k: v for k, v in (("target", target), ("token", token), ("tls_ca", tls_ca))
                 if v is not None}
    return dataclasses.replace(base, **overrides)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Protégé errors (from the server or local validation) print a message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.ProtegeError as e:
            raise _fail(str(e)) from None

    return wrapper


@app.callback()
def _global_options(
    ctx: typer.Context,
    target: Annotated[str, typer.Option(envvar=TARGET_ENV, help="learner address host:port")]
    = DEFAULT_TARGET,
    token: Annotated[str | None, typer.Option(envvar=TOKEN_ENV, help="bearer token")] = None,
    tls: Annotated[bool, typer.Option(
        "--tls", envvar="PROTEGE_TLS", help="use TLS with the system's CA roots")] = False,
    tls_ca: Annotated[Path | None, typer.Option(
        envvar="PROTEGE_TLS_CA", help="PEM CA that signed the server's certificate")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        envvar="PROTEGE_TLS_CERT", help="PEM client certificate (mTLS)")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        envvar="PROTEGE_TLS_KEY", help="PEM client key (mTLS)")] = None,
    tls_server_name: Annotated[str | None, typer.Option(
        help="name to check against the server's certificate")] = None,
    timeout: Annotated[float, typer.Option(help="seconds each call may take")] = 30.0,
) -> None:
    """Protégé: online hybrid RL + imitation fine-tuning of LLMs (arXiv 2512.23097)."""
    ctx.obj = Connection(target, token or None, tls, tls_ca, tls_cert, tls_key, tls_server_name,
                         timeout)


# ------------------------------------------------------------------------------------- job commands


@app.command()
@_handle_errors
def submit(
    ctx: typer.Context,
    job: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="YAML file of JobSpec fields")],
    watch: Annotated[bool, typer.Option("--watch", help="follow the job until it ends")] = False,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
) -> None:
    """Validate and submit a job; print its id."""
    with _connection(ctx, target, token, tls_ca).client() as client:
        info = client.submit(job)
        typer.echo(info.id)
        if watch:
            _exit_for(_follow(client, info.id))


@app.command()
@_handle_errors
def watch(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
) -> None:
    """Follow a job with a progress bar until it ends; exit 1 if it FAILED."""
    with _connection(ctx, target, token, tls_ca).client() as client:
        _exit_for(_follow(client, job_id))


@app.command("list")
@_handle_errors
def list_jobs(
    ctx: typer.Context,
    state: Annotated[list[str] | None, typer.Option(
        "--state", help="only jobs in this state (repeatable): queued, running, ...")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
) -> None:
    """List jobs, newest first."""
    with _connection(ctx, target, token, tls_ca).client() as client:
        jobs = client.list(states=state)
    if as_json:
        for job in jobs:
            typer.echo(job.model_dump_json(exclude_none=True))
        return
    Console().print(_jobs_table(jobs))


@app.command()
@_handle_errors
def get(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
) -> None:
    """Print one job as JSON."""
    with _connection(ctx, target, token, tls_ca).client() as client:
        typer.echo(client.get(job_id).model_dump_json(indent=2, exclude_none=True))


@app.command()
@_handle_errors
def cancel(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
) -> None:
    """Ask a job to stop after its current step (it ends CANCELLED)."""
    with _connection(ctx, target, token, tls_ca).client() as client:
        info = client.cancel(job_id)
    typer.echo(f"{info.id} {info.state}")


def _jobs_table(jobs: list[JobInfo]) -> Table:
    table = Table("ID", "NAME", "STATE", "STEP", "REWARD", "KL", "SUCCESS", "UPDATED",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.columns[0].min_width = max((len(j.id) for j in jobs), default=2)
    for column in (table.columns[0], table.columns[2], table.columns[7]):
        column.no_wrap = True
    for job in jobs:
        m = job.last_metrics
        total = job.spec.steps if job.spec is not None and job.spec.steps else "?"
        table.add_row(
            job.id, job.name, job.state, f"{job.step}/{total}",
            f"{m.reward_mean:.3f}" if m else "-", f"{m.kl_mean:.3f}" if m else "-",
            f"{m.success_rate:.0%}" if m else "-",
            time.strftime("%m-%d %H:%M", time.localtime(job.updated_at)))
    return table


def _follow(client: Client, job_id: str) -> JobInfo:
    """Render the job's events as a progress bar until it ends; return the final job."""
    job = client.get(job_id)
    total = job.spec.steps if job.spec is not None and job.spec.steps else None
    console = Console()
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("reward {task.fields[reward]}"), TextColumn("KL {task.fields[kl]}"),
               TextColumn("success {task.fields[success]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{job.id} {job.state}", total=total, completed=job.step,
                                 reward="-", kl="-", success="-")
        while not job.terminal:
            for event in client.watch(job_id):
                _show(progress, task, event)
            job = client.get(job_id)
            if not job.terminal:
                time.sleep(0.5)  # the stream ended early (learner restart?): reopen it
        progress.update(task, description=f"{job.id} {job.state}", completed=job.step)
    tail = f": {job.error}" if job.error else ""
    console.print(f"job {job.id} {job.state} at step {job.step}{tail}", markup=False,
                  highlight=False)
    return job


def _show(progress: Progress, task: Any, event: Any) -> None:
    if isinstance(event, StepEvent):
        m = event.metrics
        progress.update(task, completed=event.step, reward=f"{m.reward_mean:.3f}",
                        kl=f"{m.kl_mean:.3f}", success=f"{m.success_rate:.0%}")
    elif isinstance(event, StateEvent):
        progress.update(task, description=f"{event.job_id} {event.state}")
    elif isinstance(event, CheckpointEvent):
        progress.console.print(f"checkpoint written at step {event.step}", highlight=False)
    elif isinstance(event, NoticeEvent):
        progress.console.print(f"note: {event.message}", markup=False, highlight=False)
    elif isinstance(event, EvalEvent):
        m = event.metrics
        progress.console.print(
            f"eval at step {m.step}: reward {m.reward_mean:.3f} success {m.success_rate:.0%} "
            f"kl {m.kl_mean:.3f} length {m.completion_length_mean:.1f} (n={m.n})",
            markup=False, highlight=False)


def _exit_for(job: JobInfo) -> None:
    if job.state == "FAILED":
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------ reward


@reward_app.command("check")
@_handle_errors
def reward_check(
    ctx: typer.Context,
    address: Annotated[str, typer.Argument(metavar="HOST:PORT", help="the reward service")],
    token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds each check may take")] = 10.0,
) -> None:
    """Run the reward-service conformance checks; exit 1 if any fails."""
    try:
        from protege.conformance import run_checks
    except ModuleNotFoundError as e:
        raise _fail(f"the conformance checks are not installed ({e.name} is missing)") from None
    conn = _connection(ctx, address, token, tls_ca)
    results = run_checks(conn.target, token=conn.token, tls=conn.tls_config(), timeout=timeout)
    if inspect.isawaitable(results):
        results = asyncio.run(results)
    for r in results:
        label = typer.style("PASS", fg="green") if r.passed else typer.style("FAIL", fg="red")
        typer.echo(f"{label}  {r.name}" + (f"  {r.detail}" if r.detail else ""))
    failed = sum(not r.passed for r in results)
    typer.echo(f"{len(results) - failed}/{len(results)} checks passed")
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------- token


ScopeOpt = Annotated[list[str] | None, typer.Option(
    "--scope", help=f"scope the token grants (repeatable): {', '.join(SCOPES)}")]


def _checked_scopes(scopes: list[str] | None) -> list[str]:
    if not scopes:
        raise errors.InvalidArgument(f"give the token's scopes with --scope (repeatable): "
                                     f"{', '.join(SCOPES)}")
    bad = sorted(set(scopes) - set(SCOPES))
    if bad:
        raise errors.InvalidArgument(f"unknown scope(s) {bad}; valid: {list(SCOPES)}")
    return list(dict.fromkeys(scopes))


def _tokens_file_line(hashed: str, scopes: list[str]) -> str:
    return f"{hashed}: [{', '.join(scopes)}]"


@token_app.command("new")
@_handle_errors
def token_new(
    token_out: Annotated[Path, typer.Option(
        help="new file to write the token to (mode 0600); hand it to the caller, e.g. as a "
        "Secret")],
    scope: ScopeOpt = None,
) -> None:
    """Make a random 256-bit token: write it to --token-out, print its tokens-file line."""
    scopes = _checked_scopes(scope)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(token_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise errors.InvalidArgument(f"{token_out} exists; give a new path to --token-out (a "
                                     "token file is never overwritten)") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    typer.echo(_tokens_file_line(hash_token(token), scopes))


@token_app.command("hash")
@_handle_errors
def token_hash(
    scope: ScopeOpt = None,
    token_file: Annotated[Path | None, typer.Option(
        help="read the token from this file instead of stdin")] = None,
) -> None:
    """Print a token's salted hash as a tokens-file line (`HASH: [scopes]`).

    The token is read from --token-file, from stdin, or from a hidden prompt, never from the
    command line, where it would stay in the shell history and in `ps`.
    """
    scopes = _checked_scopes(scope)
    if token_file is not None:
        token = read_token_file(str(token_file))
    elif sys.stdin.isatty():
        token = typer.prompt("token", hide_input=True).strip()
    else:
        token = sys.stdin.read().strip()
    if len(token) < MIN_TOKEN_CHARS:
        typer.echo(f"warning: the token has {len(token)} characters; a salted hash protects only "
                   f"long random tokens (>= {MIN_TOKEN_CHARS}): use `protege token new`",
                   err=True)
    typer.echo(_tokens_file_line(hash_token(token), scopes))


# -------------------------------------------------------------------------------------------- up


def _parse_pairs(values: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for value in values or ():
        name, sep, rest = value.partition("=")
        if not sep:
            raise errors.InvalidArgument(f"{what} must look like NAME=VALUE, got {value!r}")
        pairs[name.strip()] = rest
    return pairs


def _write_endpoints(path: Path, endpoints: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2))
    tmp.replace(path)  # atomic: a watcher never reads half a file


class _Interrupted(Exception):
    """SIGTERM/SIGINT arrived while the services were still starting."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@app.command()
@_handle_errors
def up(
    ctx: typer.Context,
    workdir: Annotated[Path, typer.Option(help="logs, job store, checkpoints and models go here")]
    = Path(".protege/up"),
    endpoints_file: Annotated[Path | None, typer.Option(
        help="also write the {service: {grpc, metrics}} map here")] = None,
    student: Annotated[Path | None, typer.Option(help="student model dir (default: tiny)")] = None,
    teacher: Annotated[Path | None, typer.Option(help="teacher model dir (default: tiny)")] = None,
    token: Annotated[str | None, typer.Option(
        help="admin token the services require (default: the global --token)")] = None,
    scorers: Annotated[str | None, typer.Option(
        help='reward scorers as JSON, e.g. \'[{"kind": "exact_match"}]\'')] = None,
    service: Annotated[list[str] | None, typer.Option(
        help="NAME=MODULE: run your own module for a service (repeatable)")] = None,
    extra: Annotated[list[str] | None, typer.Option(
        help="NAME='ARGS': extra flags for one service, e.g. learner='--device cuda'")] = None,
    start_timeout: Annotated[float, typer.Option(help="seconds each service may take")] = 300.0,
    grace: Annotated[float, typer.Option(help="seconds services get to drain on stop")] = 10.0,
) -> None:
    """Start the four services on 127.0.0.1 and keep them up until SIGTERM or Ctrl-C."""
    from protege.launcher import Suite, ensure_default_models

    if (student is None) != (teacher is None):
        raise errors.InvalidArgument("give both --student and --teacher, or neither for the tiny "
                                     "default models")
    if student is None or teacher is None:
        typer.echo(f"building the tiny default models in {workdir / 'models'} ...", err=True)
        student, teacher = ensure_default_models(workdir / "models")
    suite = Suite(workdir, student, teacher,
                  reward_scorers=json.loads(scorers) if scorers else None,
                  token=token or _connection(ctx).token,
                  extra_args={k: shlex.split(v) for k, v in _parse_pairs(extra, "--extra").items()},
                  modules=_parse_pairs(service, "--service"), start_timeout=start_timeout)
    code = _run_suite(suite, endpoints_file, grace)
    if code:
        raise typer.Exit(code)


def _run_suite(suite: Any, endpoints_file: Path | None, grace: float) -> int:
    """Start, publish the endpoints, block until a signal (or a child dies), stop. Exit code."""
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = threading.Event()
    try:
        try:
            endpoints = suite.start()
            for s in old:
                signal.signal(s, lambda *_: stop.set())
        except _Interrupted as e:
            typer.echo(f"{e} while starting: stopped", err=True)
            return 130
        published = {n: {"grpc": e["grpc"], "metrics": e["metrics"]} for n, e in endpoints.items()}
        typer.echo(json.dumps(published))
        if endpoints_file is not None:
            _write_endpoints(endpoints_file, published)
        typer.echo(f"protege up: {len(published)} services on 127.0.0.1, logs in "
                   f"{suite.workdir / 'logs'}; SIGTERM or Ctrl-C stops them", err=True)
        return _block(suite, stop)
    finally:
        for s in old:
            signal.signal(s, lambda *_: None)  # a second Ctrl-C must not interrupt the drain
        suite.stop(grace)
        if endpoints_file is not None:
            endpoints_file.unlink(missing_ok=True)
        for s, handler in old.items():
            signal.signal(s, handler)


def _block(suite: Any, stop: threading.Event) -> int:
    while not stop.wait(0.5):
        dead = suite.poll()
        if dead:
            for name, code in dead.items():
                typer.echo(f"error: service {name} exited with code {code}; last lines of its "
                           f"log:\n{suite.log_tail(name)}", err=True)
            return 1
    typer.echo("stopping services ...", err=True)
    return 0


# ------------------------------------------------------------------------------------------- demo


@app.command("demo", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo_command(ctx: typer.Context) -> None:
    """Train tiny models end to end on this machine and write a report (options: `demo --help`)."""
    try:
        from protege.services.demo.cli import main as demo_main
    except ModuleNotFoundError as e:
        raise _fail(f"`protege demo` needs the server components ({e.name} is missing): "
                    "pip install 'protege[server]'") from None
    code = demo_main(list(ctx.args))
    if code:
        raise typer.Exit(int(code))


def main(argv: list[str] | None = None) -> None:
    """Entry point for `python -m protege` (the console script calls `app` directly)."""
    with contextlib.suppress(AttributeError):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `protege list | head` exits quietly
    app(args=argv, prog_name="protege")
