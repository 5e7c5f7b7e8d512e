"""The ``quantfarm`` command: submit and follow jobs through the API, and start the farm's processes.

Job commands talk only to the HTTP API at QUANTFARM_URL (default http://127.0.0.1:8000), sending
the API key in QUANTFARM_API_KEY.
Exit codes: 0 success, 1 a failed job or an error, 2 a usage error, 3 a cancelled job,
130 stopped watching (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from quantfarm.client import Client, CliError, build_spec

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED, EXIT_DETACHED = 0, 1, 2, 3, 130
MAX_MISSES = 10  # polls in a row the API may miss (a restart) before --wait gives up
TERMINAL = ("succeeded", "failed", "cancelled")
STATUS_STYLE = {"queued": "cyan", "running": "yellow", "succeeded": "green", "failed": "red", "cancelled": "magenta"}


# --- showing jobs ----------------------------------------------------------------


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _elapsed(job: dict) -> float | None:
    from datetime import datetime, timezone

    if not job.get("started_at"):
        return None
    start = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")) if job.get("finished_at") else datetime.now(timezone.utc)
    return (end - start).total_seconds()


def _progress_text(job: dict) -> str:
    p = job.get("progress")
    if not p:
        return ""
    eta = f", ETA {_duration(p['eta_seconds'])}" if p.get("eta_seconds") is not None and job["status"] == "running" else ""
    return f"layer {p['layers_done']}/{p['layers_total']} ({p['fraction']:.0%}){eta}"


def print_summary(job: dict) -> None:
    from rich.filesize import decimal
    from rich.markup import escape
    from rich.table import Table

    style = STATUS_STYLE.get(job["status"], "")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("job", job["id"]),
        ("status", f"[{style}]{job['status']}[/]" + (" (cancel requested)" if job.get("cancel_requested") and job["status"] == "running" else "")),
        ("method", job["method"]), ("model", escape(job["model"])), ("attempt", str(job["attempt"])),
        ("stage", job.get("stage") or ""), ("progress", _progress_text(job)),
        ("created", job["created_at"]), ("started", job.get("started_at") or ""), ("finished", job.get("finished_at") or ""),
        ("duration", _duration(_elapsed(job))),
    ]
    if job.get("error"):
        rows.append(("error", f"[red]{escape(job['error']['code'])}[/]: {escape(job['error'].get('message') or '')}"))
    for k, v in sorted((job.get("metrics") or {}).items()):
        if isinstance(v, (int, float, str)):  # per-layer series belong on the web page, not here
            rows.append((escape(k), escape(str(v))))
    for art in job.get("artifacts") or []:
        where = escape(art.get("hub_url") or art.get("location") or "")
        rows.append(("artifact", f"{art['id']}  {art['format']}  {art['files']} files  {decimal(art['size_bytes'])}  {where}"))
    for k, v in rows:
        if v:
            grid.add_row(k, v)
    _console().print(grid)


def print_jobs(page: dict) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    wide = console.width >= 110  # below that, the creation time gives way to the model name
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    widths = {"ID": 30, "Status": 9, "Method": 8, "Model": 10, "Layers": 6, "Created": 11, "Time": 6}
    for name in ("ID", "Status", "Method", "Model", "Layers", *(("Created",) if wide else ()), "Time"):
        # Model is the one column that wraps when the terminal is narrow.
        table.add_column(name, no_wrap=name != "Model", overflow="fold", min_width=widths[name], ratio=1 if name == "Model" else None)
    for job in page["items"]:
        p = job.get("progress") or {}
        created = (job["created_at"] or "")[5:16].replace("T", " ")
        table.add_row(job["id"], f"[{STATUS_STYLE.get(job['status'], '')}]{job['status']}[/]", job["method"], escape(job["model"]),
                      f"{p['layers_done']}/{p['layers_total']}" if p else "", *((created,) if wide else ()), _duration(_elapsed(job)))
    console.print(table)
    if page.get("next_cursor"):
        console.print(f"more: quantfarm jobs --cursor {page['next_cursor']}")


# --- following a job ----------------------------------------------------------------------


def _follow(client: Client, job_id: str, interval: float, console) -> dict:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.fields[stage]}"), BarColumn(), TextColumn("{task.fields[layers]}"),
               TextColumn("{task.fields[eta]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(job_id, total=None, stage="", layers="", eta="")
        misses = 0
        while True:
            try:
                job = client.get(f"/v1/jobs/{job_id}")
            except CliError as exc:
                if exc.code not in ("connection_failed", "timeout") or misses >= MAX_MISSES:
                    raise
                misses += 1
                progress.update(task, stage="API unreachable; retrying")
                time.sleep(min(2.0 * misses, 10.0))
                continue
            misses = 0
            p = job.get("progress") or {}
            stage = job.get("stage") or job["status"]
            if job["status"] == "running" and job.get("cancel_requested"):
                stage += " (cancelling)"
            eta = p.get("eta_seconds")
            progress.update(
                task, total=p.get("layers_total"), completed=p.get("layers_done") or 0, stage=f"{stage} (attempt {job['attempt']})",
                layers=f"layer {p['layers_done']}/{p['layers_total']}" if p else "", eta=f"ETA {_duration(eta)}" if eta is not None else "",
            )
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval)


def _wants_cancel(job_id: str, console) -> bool:
    if not sys.stdin.isatty():
        return False  # nobody to ask: stopping the watch is the safe default
    from rich.prompt import Prompt

    try:
        answer = Prompt.ask(f"Cancel job {job_id}, or only stop watching?", choices=["cancel", "stop"], default="stop", console=console)
    except (KeyboardInterrupt, EOFError):
        return False
    return answer == "cancel"


def wait_for(client: Client, job_id: str, interval: float) -> tuple[int, dict | None]:
    """Show the job's progress until it ends; return (exit code, final job or None)."""
    console = _console(stderr=True)
    cancel_sent = False
    while True:
        try:
            job = _follow(client, job_id, interval, console)
            break
        except KeyboardInterrupt:
            if cancel_sent or not _wants_cancel(job_id, console):
                console.print(f"Stopped watching {job_id}; the job keeps going. Follow it with: quantfarm status {job_id}")
                return EXIT_DETACHED, None
            cancel_sent = True
            try:
                job = client.post(f"/v1/jobs/{job_id}/cancel")
            except CliError as exc:
                if exc.code != "invalid_state":
                    raise
                job = {"status": "ended"}  # it finished meanwhile; the next poll shows how
            if job["status"] == "running":
                console.print("Cancel requested; the job stops within seconds. Ctrl-C again only stops watching.")
    if job["status"] == "succeeded":
        console.print(f"[green]succeeded[/]: {job_id} in {_duration(_elapsed(job))}")
        for art in job.get("artifacts") or []:
            console.print(f"  artifact {art['id']}: {art.get('hub_url') or art.get('location') or ''}", markup=False)
        return EXIT_OK, job
    if job["status"] == "cancelled":
        console.print(f"[magenta]cancelled[/]: {job_id}")
        return EXIT_CANCELLED, job
    err = job.get("error") or {"code": "job_failed", "message": "the job failed without an error message"}
    print(f"error: {err['code']}: {err.get('message') or ''}", file=sys.stderr)
    return EXIT_ERROR, job


# --- commands -------------------------------------------------------------------------------


def cmd_submit(a, settings) -> int:
    client = Client.from_settings(settings)
    job = client.post("/v1/jobs", build_spec(client, a))
    if not a.json:
        print(job["id"], flush=True)
    code = EXIT_OK
    if a.wait:
        code, final = wait_for(client, job["id"], a.poll_interval)
        job = final or job
    if a.json:
        print(json.dumps(job, indent=2))
    return code


def cmd_status(a, settings) -> int:
    job = Client.from_settings(settings).get(f"/v1/jobs/{a.job_id}")
    if a.json:
        print(json.dumps(job, indent=2))
    else:
        print_summary(job)
    return EXIT_OK


def cmd_cancel(a, settings) -> int:
    job = Client.from_settings(settings).post(f"/v1/jobs/{a.job_id}/cancel")
    if job["status"] == "cancelled":
        print(f"{a.job_id} cancelled")
    else:
        print(f"{a.job_id} cancel requested; it stops within seconds")
    return EXIT_OK


def cmd_retry(a, settings) -> int:
    job = Client.from_settings(settings).post(f"/v1/jobs/{a.job_id}/retry")
    print(f"{a.job_id} queued again (attempt {job['attempt']})")
    return EXIT_OK


def cmd_jobs(a, settings) -> int:
    page = Client.from_settings(settings).get("/v1/jobs", status=a.status, limit=a.limit, cursor=a.cursor)
    if a.json:
        print(json.dumps(page, indent=2))
    else:
        print_jobs(page)
    return EXIT_OK


def cmd_migrate(a, settings) -> int:
    from sqlalchemy.engine import make_url

    from storage.migrate import upgrade

    url = settings.resolved_database_url
    upgrade(url)
    print(f"database {make_url(url).render_as_string(hide_password=True)} is at the latest schema")
    return EXIT_OK


def cmd_gc(a, settings) -> int:
    from storage.artifacts import make_store
    from storage.db import Database
    from storage.retention import GcAges, collect

    db = Database.from_settings(settings)
    try:
        report = collect(db, make_store(settings), settings, GcAges.from_settings(settings, a.artifacts_older_than))
    finally:
        db.dispose()
    out = report.as_dict()
    print(json.dumps(out, indent=2) if a.json else "\n".join(
        f"{k}: {len(v) if isinstance(v, list) else v}" for k, v in out.items()))
    return EXIT_OK


def cmd_api(a, settings) -> int:
    from api.app import serve

    return serve(settings)


def cmd_run(a, settings) -> int:
    from quantfarm.supervisor import run_embedded

    sys.exit(run_embedded(settings))


def cmd_worker(a, settings) -> int:
    from quantfarm.supervisor import run_worker

    sys.exit(run_worker(settings))


def build_parser() -> argparse.ArgumentParser:
    from quantfarm import __version__
    from quantfarm.spec import METHODS

    p = argparse.ArgumentParser(prog="quantfarm", description="Quantize models on the farm and follow the jobs.")
    p.add_argument("--version", action="version", version=f"quantfarm {__version__}")
    p.add_argument("--url", help="API address (default: QUANTFARM_URL, or http://QUANTFARM_HOST:QUANTFARM_PORT)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="submit a quantization job")
    s.add_argument("model", help="/absolute/path, s3://bucket/prefix, upload:<id>, or a Hub id org/name[@revision]")
    s.add_argument("--method", required=True, choices=METHODS)
    s.add_argument("--bits", type=int)
    s.add_argument("--group-size", type=int)
    s.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None, help="symmetric quantization")
    s.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None, help="GPTQ act-order (on by default)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any other method option (repeatable)")
    s.add_argument("--format", action="append", default=[], metavar="FORMAT",
                   help="output format, one artifact each (repeatable; default: the method's own)")
    s.add_argument("--calib", help="builtin:<name>, hub:<dataset>[:<config>][:<split>], upload:<id>, or a local text file to upload")
    s.add_argument("--samples", type=int, help="calibration samples")
    s.add_argument("--seq-len", type=int, help="calibration sequence length")
    s.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                   help="measure perplexity before and after (on by default)")
    s.add_argument("--hub-repo", help="also publish to this Hub repo (org/name)")
    s.add_argument("--webhook", action="append", default=[], metavar="URL", help="URL to call when the job ends (repeatable)")
    s.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the job (repeatable)")
    s.add_argument("--priority", type=int)
    s.add_argument("--wait", action="store_true", help="show progress until the job ends; exit 0 only on success")
    s.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true", help="print the job object as JSON")
    s.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "show a job"), ("cancel", cmd_cancel, "cancel a job"), ("retry", cmd_retry, "retry a failed or cancelled job")):
        c = sub.add_parser(name, help=text)
        c.add_argument("job_id")
        if name == "status":
            c.add_argument("--json", action="store_true", help="print the API's job object")
        c.set_defaults(func=func)

    j = sub.add_parser("jobs", help="list jobs, newest first")
    j.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--cursor", help="next page, as printed under the table")
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_jobs)

    g = sub.add_parser("gc", help="delete what the retention settings say has expired (QUANTFARM_GC_*, QUANTFARM_RETRY_WINDOW)")
    g.add_argument("--artifacts-older-than", type=float, metavar="DAYS",
                   help="also delete succeeded jobs' artifacts older than this (never without it)")
    g.add_argument("--json", action="store_true", help="print what was removed as JSON")
    g.set_defaults(func=cmd_gc)

    for name, func, text in (("migrate", cmd_migrate, "bring the database schema up to date"), ("api", cmd_api, "serve the HTTP API"),
                             ("run", cmd_run, "run the embedded stack: API, worker and sweeper"), ("worker", cmd_worker, "run a worker")):
        sub.add_parser(name, help=text).set_defaults(func=func)
    from quantfarm.cli_access import add_commands

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``quantfarm`` command line; return the exit code."""
    from pydantic import ValidationError

    from quantfarm.settings import Settings

    args = build_parser().parse_args(argv)
    try:
        settings = Settings(url=args.url) if args.url else Settings()
        return args.func(args, settings)
    except CliError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        for field, why in sorted((exc.details.get("fields") or {}).items()):
            print(f"  {field}: {why}", file=sys.stderr)
        return EXIT_USAGE if exc.code == "bad_argument" else EXIT_ERROR
    except ValidationError as exc:
        # Name the fields only: the values may be secrets.
        bad = "; ".join(f"QUANTFARM_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid_settings: {bad}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_DETACHED
    except BrokenPipeError:  # e.g. `quantfarm jobs | head`: the reader left; stay quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
