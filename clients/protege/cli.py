"""The `protege` command line: submit and follow jobs, check a reward service, run services locally.

    protege up                               # the four services on 127.0.0.1, as context "local"
    protege submit job.yaml --watch          # targets the YAML leaves out come from the context
    protege list [-o wide|json|yaml] | get ID | describe ID | cancel ID | delete ID | watch ID
    protege logs ID [-f]                     # the job's history: steps, evaluations, its end
    protege metrics ID -o csv > curves.csv   # one row per step; `protege plot ID` draws a PNG
    protege samples ID [--step N]            # completions sampled during training
    protege context list | use NAME | show   # contexts (like kubeconfig), in $PROTEGE_CONFIG
    protege reward check 127.0.0.1:50053     # conformance checks for a reward service
    protege token new --scope jobs --token-out me.token >> tokens.yaml   # a server's tokens file
    protege token hash --scope reward < reward.token >> tokens.yaml
    protege demo                             # the CPU demo (needs `pip install 'protege[server]'`)
    protege version | --install-completion   # shell completion for bash, zsh, fish

Connection options (`--target`, `--context`, `--token`, `--tls-ca`, ...) go before the command or,
for the job commands, after it. The learner is `--target` or $PROTEGE_TARGET if given, else the
context's learner (`--context`, $PROTEGE_CONTEXT or the current context), else 127.0.0.1:50051.
A server error prints one line and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import importlib.metadata
import inspect
import json
import os
import platform
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
import yaml
from rich.console import Console

from protege import contexts, curves, errors, render
from protege.client import DEFAULT_TARGET, TARGET_ENV, TOKEN_ENV, Client
from protege.contexts import CONTEXT_ENV, Context
from protege.serving import SCOPES, TLSConfig, hash_token, read_token_file
from protege.spec import JobInfo, JobSpec

app = typer.Typer(name="protege", no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False,
                  help="Protégé: online hybrid RL + imitation fine-tuning of LLMs.")
reward_app = typer.Typer(no_args_is_help=True, help="Tools for reward-service authors.")
app.add_typer(reward_app, name="reward")
token_app = typer.Typer(no_args_is_help=True,
                        help="Make bearer tokens and the hashed lines of servers' tokens files.")
app.add_typer(token_app, name="token")
context_app = typer.Typer(no_args_is_help=True,
                          help="Named contexts: where a suite's services are (like kubeconfig).")
app.add_typer(context_app, name="context")
# A salted SHA-256 protects random tokens; a shorter, chosen one could be guessed from its hash.
MIN_TOKEN_CHARS = 24


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where and how to reach a service: the global options, overridden per command."""

    target: str | None = None  # None: from the context, else DEFAULT_TARGET
    token: str | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    timeout: float = 30.0
    context_name: str | None = None  # --context / $PROTEGE_CONTEXT
    context: Context | None = None  # the context in effect, once resolved

    def tls_config(self) -> TLSConfig | None:
        if not (self.tls or self.tls_ca or self.tls_cert):
            return None
        s = lambda p: str(p) if p else None
        return TLSConfig(ca=s(self.tls_ca), cert=s(self.tls_cert), key=s(self.tls_key),
                         server_name=self.tls_server_name)

    def client(self) -> Client:
        # token="" (not None) so an unset --token does not fall back to the env a second time.
        return Client(self.target or DEFAULT_TARGET, token=self.token or "",
                      tls=self.tls_config(), timeout=self.timeout)


TargetOpt = Annotated[str | None, typer.Option(
    "--target", help="learner address host:port (overrides the global --target)")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="bearer token (overrides the global --token)")]
TlsCaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", help="PEM CA of the server's certificate; turns TLS on")]
ContextOpt = Annotated[str | None, typer.Option(
    "--context", help="named context (`protege context list`; overrides the global --context)")]


class Output(str, enum.Enum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


class MetricsOutput(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="output format")]


def _connection(ctx: typer.Context, target: str | None = None, token: str | None = None,
                tls_ca: Path | None = None, context: str | None = None) -> Connection:
    """The global options with this command's overrides, and the context in effect: the one
    named by --context/$PROTEGE_CONTEXT, or the current one when no target was given."""
    base: Connection = ctx.find_root().obj or Connection()
    target = target or base.target
    name = context or base.context_name
    resolved = contexts.resolve(name) if name or not target else None
    token = token or base.token
    found = None
    if resolved is not None:
        name, found = resolved
        if not target:
            target = found.learner
            token = token or found.token  # the context's token goes to its own learner only
    return dataclasses.replace(base, target=target, token=token,
                               tls_ca=tls_ca if tls_ca is not None else base.tls_ca,
                               context_name=name, context=found)


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
    target: Annotated[str | None, typer.Option(
        envvar=TARGET_ENV, help=f"learner address host:port (default: the context's learner, "
        f"else {DEFAULT_TARGET})")] = None,
    context: Annotated[str | None, typer.Option(
        envvar=CONTEXT_ENV, help="named context to use instead of the current one")] = None,
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
    ctx.obj = Connection(target or None, token or None, tls, tls_ca, tls_cert, tls_key,
                         tls_server_name, timeout, context or None)


# ------------------------------------------------------------------------------------- job commands


def _spec_with_context(path: Path, conn: Connection) -> JobSpec:
    """The job YAML with every target (and the student model) it leaves out filled from the
    context in effect; a field given in the YAML, even empty, is kept."""
    if conn.context is None:
        return JobSpec.from_yaml(path)
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        return JobSpec.from_yaml(path)  # its own message for a missing or malformed file
    filled = {k: v for k, v in conn.context.job_defaults().items() if k not in data}
    if filled:
        typer.echo(f"from context {conn.context_name!r}: {', '.join(sorted(filled))}", err=True)
    return JobSpec._validate({**data, **filled}, f"job spec {path}")


@app.command()
@_handle_errors
def submit(
    ctx: typer.Context,
    job: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="YAML file of JobSpec fields")],
    watch: Annotated[bool, typer.Option("--watch", help="follow the job until it ends")] = False,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Validate and submit a job; print its id (targets it leaves out come from the context)."""
    conn = _connection(ctx, target, token, tls_ca, context)
    spec = _spec_with_context(job, conn)
    with conn.client() as client:
        info = client.submit(spec)
        typer.echo(info.id)
        if watch:
            _exit_for(_follow(client, info.id))


@app.command()
@_handle_errors
def watch(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Follow a job until it ends; exit 1 if it FAILED (one line per step off a terminal)."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        _exit_for(_follow(client, job_id))


@app.command("list")
@_handle_errors
def list_jobs(
    ctx: typer.Context,
    state: Annotated[list[str] | None, typer.Option(
        "--state", help="only jobs in this state (repeatable): queued, running, ...")] = None,
    output: OutputOpt = Output.table,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """List jobs, newest first."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        jobs = client.list(states=state)
    if as_json:
        for job in jobs:
            typer.echo(json.dumps(render.job_dict(job)))
    elif output == Output.json:
        typer.echo(json.dumps([render.job_dict(j) for j in jobs], indent=2))
    elif output == Output.yaml:
        typer.echo(render.to_yaml([render.job_dict(j) for j in jobs]), nl=False)
    elif not jobs:
        where = f" in state {', '.join(s.upper() for s in state)}" if state else ""
        typer.echo(f"No jobs found{where}.", err=True)
    else:
        typer.echo(render.jobs_table(jobs, wide=output == Output.wide))


@app.command()
@_handle_errors
def get(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    output: OutputOpt = Output.table,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Show one job: a table row, or the whole record with -o json|yaml."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        job = client.get(job_id)
    if output == Output.json:
        typer.echo(json.dumps(render.job_dict(job), indent=2))
    elif output == Output.yaml:
        typer.echo(render.to_yaml(render.job_dict(job)), nl=False)
    else:
        typer.echo(render.jobs_table([job], wide=output == Output.wide))


@app.command()
@_handle_errors
def describe(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Show a job in detail: progress, settings, last step, evaluations, samples logged."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        job = client.get(job_id)
        history = client.metrics(job_id)
        logged = client.samples(job_id).logged_steps
    typer.echo(render.describe(job, (history.steps, history.evals), logged))


@app.command()
@_handle_errors
def cancel(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Ask a job to stop after its current step (it ends CANCELLED)."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        info = client.cancel(job_id)
    typer.echo(f"{info.id} {info.state}")


@app.command()
@_handle_errors
def delete(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    checkpoints: Annotated[bool, typer.Option(
        "--checkpoints", help="also delete its checkpoint directory on the learner")] = False,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Forget a finished job and its history (cancel a running one first)."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        removed = client.delete(job_id, delete_checkpoints=checkpoints)
    typer.echo(f"{job_id} deleted" + (f"; removed {removed}" if removed else ""))


@app.command()
@_handle_errors
def logs(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until it ends")]
    = False,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print the job's history, one line per step and evaluation, then how it ended."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        job = client.get(job_id)
        history = client.metrics(job_id)
        total = render.total_steps(job)
        lines = [(m.step, 0, render.step_line(m, total)) for m in history.steps]
        lines += [(m.step, 1, render.eval_line(m)) for m in history.evals]
        for _, _, line in sorted(lines):
            typer.echo(line)
        if follow and not job.terminal:
            _exit_for(_follow(client, job_id, force_lines=True,
                              after_step=history.steps[-1].step if history.steps else 0))
            return
    typer.echo(render.final_line(job, render.checkpoint_of(job, None)))


@app.command()
@_handle_errors
def metrics(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    output: Annotated[MetricsOutput, typer.Option("--output", "-o", help="output format")]
    = MetricsOutput.table,
    evals: Annotated[bool, typer.Option(
        "--evals", help="the evaluations instead of the steps (table and csv)")] = False,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print a job's curves: one row per step (or evaluation), as a table, CSV or JSON."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        history = client.metrics(job_id)
    if output == MetricsOutput.json:
        typer.echo(json.dumps({"job_id": job_id,
                               "steps": [m.model_dump() for m in history.steps],
                               "evals": [m.model_dump() for m in history.evals]}, indent=2))
    elif output == MetricsOutput.csv:
        if evals:
            text = curves.write_csv([m.model_dump() for m in history.evals],
                                    curves.eval_columns())
        else:
            text = curves.write_csv([curves.step_row(m) for m in history.steps],
                                    curves.step_columns())
        typer.echo(text, nl=False)
    elif evals:
        rows = [[str(m.step), str(m.n), f"{m.reward_mean:.4f}", f"{m.success_rate:.0%}",
                 f"{m.kl_mean:.4f}", f"{m.completion_length_mean:.1f}"] for m in history.evals]
        _echo_rows(("STEP", "N", "REWARD", "SUCCESS", "KL", "LENGTH"), rows, "evaluations")
    else:
        _echo_rows([h for h, _, _ in curves.TABLE_COLUMNS],
                   [curves.table_cells(m) for m in history.steps], "steps")


def _echo_rows(headers: Any, rows: list[list[str]], what: str) -> None:
    if rows:
        typer.echo(render.columns(headers, rows))
    else:
        typer.echo(f"No {what} stored yet.", err=True)


@app.command()
@_handle_errors
def plot(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="PNG to write (default: ID.png)")] = None,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Draw the job's reward, KL, success and gradient curves into a PNG; print its path."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        history = client.metrics(job_id)
        name = client.get(job_id).name
    path = curves.plot(file or Path(f"{job_id}.png"), history.steps, history.evals,
                       title=f"{job_id} {name}".strip())
    typer.echo(str(path))


@app.command()
@_handle_errors
def samples(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")],
    step: Annotated[int, typer.Option(help="the step whose samples to show (0 = latest)")] = 0,
    output: OutputOpt = Output.table,
    target: TargetOpt = None, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
    context: ContextOpt = None,
) -> None:
    """Show completions sampled during training (JobSpec.sample_log_every)."""
    with _connection(ctx, target, token, tls_ca, context).client() as client:
        table = client.samples(job_id, step)
    if output in (Output.json, Output.yaml):
        data = {"job_id": table.job_id, "step": table.step, "logged_steps": table.logged_steps,
                "samples": [s.model_dump() for s in table.samples]}
        typer.echo(json.dumps(data, indent=2) if output == Output.json
                   else render.to_yaml(data), nl=output == Output.json)
    elif not table.samples:
        typer.echo(f"No samples logged for {job_id} yet (every sample_log_every steps).",
                   err=True)
    else:
        typer.echo(f"step {table.step} (logged at steps "
                   f"{', '.join(map(str, table.logged_steps))})")
        typer.echo(render.samples_table(table.samples, width=200 if output == Output.wide
                                        else 60))


def _follow(client: Client, job_id: str, force_lines: bool = False,
            after_step: int = 0) -> JobInfo:
    """Show the job's events until it ends, then the final line; return the final job."""
    job = client.get(job_id)
    console = Console(soft_wrap=True)
    with render.WatchView(job, console, force_lines, after_step) as view:
        while not job.terminal:
            for event in client.watch(job_id):
                view.show(event)
            job = client.get(job_id)
            if not job.terminal:
                time.sleep(0.5)  # the stream ended early (learner restart?): reopen it
        view.finish(job)
    console.print(render.final_line(job, render.checkpoint_of(job, view.checkpoint)),
                  markup=False, highlight=False, soft_wrap=True)
    return job


def _exit_for(job: JobInfo) -> None:
    if job.state == "FAILED":
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------- context


@context_app.command("list")
@_handle_errors
def context_list() -> None:
    """List the contexts; * marks the current one."""
    config = contexts.load()
    if not config.contexts:
        typer.echo(f"No contexts in {contexts.config_path()}; `protege up` writes one.", err=True)
        return
    rows = [["*" if name == config.current_context else "", name, c.learner,
             ",".join(c.generators) or "-", c.reference or "-", c.reward or "-"]
            for name, c in sorted(config.contexts.items())]
    typer.echo(render.columns(("CURRENT", "NAME", "LEARNER", "GENERATORS", "REFERENCE",
                               "REWARD"), rows))


@context_app.command("use")
@_handle_errors
def context_use(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Make NAME the current context."""
    context = contexts.use(name)
    typer.echo(f"current context: {name} (learner {context.learner})")


@context_app.command("show")
@_handle_errors
def context_show(
    name: Annotated[str | None, typer.Argument(metavar="[NAME]")] = None,
    show_token: Annotated[bool, typer.Option(help="print the token instead of ***")] = False,
) -> None:
    """Print a context (default: the one in effect) as YAML."""
    resolved = contexts.resolve(name)
    if resolved is None:
        raise errors.NotFound("no current context: `protege up` writes one, `protege context "
                              "use NAME` picks one")
    found_name, context = resolved
    data = context.model_dump(exclude_none=True)
    if "token" in data and not show_token:
        data["token"] = "***"
    typer.echo(render.to_yaml({"name": found_name, **data}), nl=False)


# ---------------------------------------------------------------------------------------- version


@app.command()
def version() -> None:
    """Print the SDK's version (and its Python's)."""
    try:
        ours = importlib.metadata.version("protege")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown (not installed as a package)"
    typer.echo(f"protege {ours} (protos protege.v1, Python {platform.python_version()})")


# ------------------------------------------------------------------------------------------ reward


@reward_app.command("check")
@_handle_errors
def reward_check(
    ctx: typer.Context,
    address: Annotated[str | None, typer.Argument(
        metavar="[HOST:PORT]", help="the reward service (default: the context's reward)")] = None,
    token: TokenOpt = None, tls_ca: TlsCaOpt = None, context: ContextOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds each check may take")] = 10.0,
) -> None:
    """Run the reward-service conformance checks; exit 1 if a required one fails."""
    try:
        from protege.conformance import run_checks
    except ModuleNotFoundError as e:
        raise _fail(f"the conformance checks are not installed ({e.name} is missing)") from None
    if address is None:
        base: Connection = ctx.find_root().obj or Connection()
        resolved = contexts.resolve(context or base.context_name)
        if resolved is None or not resolved[1].reward:
            raise errors.InvalidArgument("give the reward service's HOST:PORT, or use a context "
                                         "that names one (`protege context show`)")
        address = resolved[1].reward
    conn = _connection(ctx, address, token, tls_ca)
    results = run_checks(conn.target, token=conn.token, tls=conn.tls_config(), timeout=timeout)
    if inspect.isawaitable(results):
        results = asyncio.run(results)
    for r in results:
        label = (typer.style("PASS", fg="green") if r.passed else
                 typer.style("FAIL", fg="red") if r.required else typer.style("WARN", fg="yellow"))
        typer.echo(f"{label}  {r.name}" + (f"  {r.detail}" if r.detail else ""))
    failed = sum(not r.passed and r.required for r in results)
    warned = sum(not r.passed and not r.required for r in results)
    typer.echo(f"{len(results) - failed - warned}/{len(results)} checks passed"
               + (f", {warned} warning(s)" if warned else ""))
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
    learner_procs: Annotated[int, typer.Option(
        help="run the learner as a torchrun world of N processes (FSDP2; rank 0 serves)")] = 1,
    learner_restarts: Annotated[int, typer.Option(
        help="torchrun --max-restarts for the learner world")] = 0,
    context_name: Annotated[str, typer.Option(
        "--context-name", help="context to write (and make current) while the services run; "
        "'' writes none")] = "local",
) -> None:
    """Start the four services on 127.0.0.1 and keep them up until SIGTERM or Ctrl-C.

    While they run, context `--context-name` names them (and the student they serve) and is
    the current one, so `protege submit job.yaml` needs no addresses; it is removed on stop."""
    from protege.launcher import Suite, ensure_default_models

    if (student is None) != (teacher is None):
        raise errors.InvalidArgument("give both --student and --teacher, or neither for the tiny "
                                     "default models")
    if student is None or teacher is None:
        typer.echo(f"building the tiny default models in {workdir / 'models'} ...", err=True)
        student, teacher = ensure_default_models(workdir / "models")
    suite = Suite(workdir, student, teacher,
                  reward_scorers=json.loads(scorers) if scorers else None,
                  token=token or (ctx.find_root().obj or Connection()).token,
                  extra_args={k: shlex.split(v) for k, v in _parse_pairs(extra, "--extra").items()},
                  modules=_parse_pairs(service, "--service"), start_timeout=start_timeout,
                  learner_procs=learner_procs, learner_restarts=learner_restarts)
    code = _run_suite(suite, endpoints_file, grace, context_name)
    if code:
        raise typer.Exit(code)


def _suite_context(suite: Any, published: dict[str, dict[str, Any]]) -> Context:
    return Context(learner=published["learner"]["grpc"],
                   generators=[published["generator"]["grpc"]],
                   reference=published["reference"]["grpc"], reward=published["reward"]["grpc"],
                   student_model=str(suite.student), token=suite.token or None)


def _run_suite(suite: Any, endpoints_file: Path | None, grace: float,
               context_name: str = "") -> int:
    """Start, publish the endpoints (and the context), block until a signal (or a child dies),
    stop. Exit code."""
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = threading.Event()
    previous: str | None = None
    wrote_context = False
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
        if context_name:  # before the endpoints file: whoever waits for that finds both
            previous = contexts.put(context_name, _suite_context(suite, published))
            wrote_context = True
            typer.echo(f"current context: {context_name} ({contexts.config_path()})", err=True)
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
        if wrote_context:
            contexts.remove(context_name, restore_current=previous)
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
