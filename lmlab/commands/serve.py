"""`lmlab serve` (an OpenAI-compatible API), `lmlab answer` (a run's answers to instructions) and `lmlab judge`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.table import Table

from lmlab.api.loading import decode_step
from lmlab.commands.common import (
    add_checkpoint,
    add_compile,
    add_device,
    add_sampling,
    check_destination,
    console,
    count,
    destination,
    port,
    samplings,
    within,
)
from lmlab.core.errors import UserError


def model_name(text: str) -> str:
    """A model id: printable, no spaces, at most 256 characters (OpenAI's ids and vLLM's names are such)."""
    if not text or len(text) > 256 or not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name: 1 to 256 printable characters, no spaces")
    return text


def cmd_serve(args: argparse.Namespace) -> None:
    since = time.perf_counter()
    from lmlab.core.extras import SERVE, require

    require(*SERVE, user="lmlab serve")  # before the serving modules, which import them
    from lmlab.serving.app import check_exposure, run_server
    from lmlab.serving.edge import ServeLimits, ServeOptions, bind
    from lmlab.serving.state import State

    check_exposure(args.host, args.api_key, args.insecure)
    limits = ServeLimits(args.max_connections, args.max_client_connections, args.header_timeout, args.body_timeout,
                         args.idle_timeout)
    names = args.served_model_name or [Path(args.run).resolve().name]
    if len(set(names)) < len(names):
        raise UserError(f"--served-model-name lists a name twice ({' '.join(names)}); give each once.")
    options = ServeOptions(Path(args.run), args.checkpoint, args.device, args.max_tokens_cap, args.max_batch,
                           args.max_queue, args.max_body_bytes, args.compile, args.threads, args.quantize)
    startup = None

    def begin(state: State) -> None:  # once the port answers: torch and the model load behind it
        nonlocal startup
        from lmlab.serving.startup import Startup

        startup = Startup(state, options, since)
        startup.begin()

    sock = bind(args.host, args.port)  # a port in use is said at once, before torch and the model load
    bound = sock.getsockname()[1]  # --port 0's is the one the system chose: this line is where a client learns it
    state = State(names, args.api_key, begin, limits)
    # On stdout, as a command's result: stderr is the log, and a refusal while loading is its only line.
    console.print(f"lmlab serve: {args.run} as model {names[0]!r} at http://{args.host}:{bound}/v1 (/health "
                  f"says 503 until it has loaded; up to {args.max_batch} choices decoded at once, {args.max_queue} "
                  f"requests queued{'; API key required' if args.api_key else ''}); a first Ctrl-C or SIGTERM "
                  f"drains for up to {args.drain_seconds:g}s, a second stops at once", highlight=False, markup=False)
    status = 1  # cut short, unless the server says otherwise
    try:
        status = run_server(state, sock, args.drain_seconds)
    finally:
        if startup is not None:
            startup.stop(wait=status != 1)
    if state.failure:
        raise UserError(state.failure)
    state.log("lmlab serve: stopped" + (" at once; requests still running were cut" if status else ""))
    if status:
        # Cut short, nothing left to write: the decoding thread may still be inside torch, where the interpreter's
        # shutdown aborts the process (SIGABRT) instead of exiting with the status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def cmd_answer(args: argparse.Namespace) -> None:
    from lmlab.api.run import used_run
    from lmlab.evals.judge import write_answers

    params = samplings(args)[0]
    run, notes = used_run(args.run, args.checkpoint, args.device, "decoding")  # said as sample says
    step = decode_step(run, args.batch_size, "--batch-size", params, args.compile, console, args.quantize)
    with console.status("Answering...") as status:
        n = write_answers(run, Path(args.data), Path(args.out), params, args.batch_size, step,
                          lambda done, total: status.update(f"Answering: {done}/{total} records"), notes.heard())
    notes.flush()
    console.print(f"wrote {n} answers to {args.out}")


def cmd_judge(args: argparse.Namespace) -> None:
    from lmlab.evals.judge import judge_answers

    answers = Path(args.answers)
    out = check_destination(args.out or answers.with_name(f"{answers.stem}-judged.jsonl"), "--out", "file")
    with console.status("Judging...") as status:
        summary = judge_answers(answers, args.endpoint, args.model, out, args.max_tokens,
                                lambda done, total: status.update(f"Judging: {done}/{total} answers"))
    total = len(summary.items)
    if not summary.scored:
        raise UserError(f"judge {args.model} scored none of the {total} answers: {summary.unscored()}; the replies are "
                        f"in {out}.")
    unscored = f" ({total - len(summary.scored)} unscored: {summary.unscored()})" if summary.unscored() else ""
    console.print(f"judge {args.model}: mean score {summary.mean:.1f} over {len(summary.scored)} of {total} answers "
                  f"scored{unscored}", highlight=False)
    not_kept = summary.attached.startswith("not kept")
    console.print(summary.attached if not_kept else f"the mean is kept in run {summary.attached}: `lmlab runs`, "
                  "`compare` and `report` show it", highlight=False)
    table = Table(title=f"Lowest-scored answers (of {len(summary.scored)})")
    for column in ("score", "instruction", "input", "model answer", "reference"):
        table.add_column(column, overflow="fold", justify="right" if column == "score" else "left")
    for item in summary.scored[:args.lowest]:
        table.add_row(str(item["score"]), item["instruction"], item.get("input", ""), item["model_answer"],
                      item["output"])
    console.print(table)
    console.print(f"per-item scores: {out}")


def add_limits(p: argparse.ArgumentParser) -> None:
    """The request limits of lmlab.serving.edge.ServeOptions, then the connection limits and the timeouts of its
    ServeLimits, with their defaults."""
    from lmlab.serving.edge import ServeLimits, ServeOptions

    o, d = ServeOptions, ServeLimits()
    p.add_argument("--max-tokens-cap", type=count(), default=o.max_tokens_cap,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=count(), default=o.max_batch,
                   help="choices decoded together in one batch; requests join it as rows free up")
    p.add_argument("--max-queue", type=count(0), default=o.max_queue,
                   help="requests waiting for the batch; one more gets HTTP 429 with Retry-After")
    p.add_argument("--max-body-bytes", type=count(1024), default=o.max_body_bytes,
                   help="largest request body; a larger one gets HTTP 413 unread")
    connections, seconds = count(1, 1_000_000), within(0, 86_400, above=True)  # at most a day
    p.add_argument("--max-connections", type=connections, default=d.max_connections,
                   help="connections open at once; one more closes the oldest idle one, or gets HTTP 503 when every "
                   "one has a request under way")
    p.add_argument("--max-client-connections", type=connections, default=d.max_client_connections,
                   help="connections open at once from one address, counted as --max-connections (raise it behind a "
                   "proxy, whose clients share its address)")
    p.add_argument("--header-timeout", type=seconds, default=d.header_timeout,
                   help="seconds a request's headers may take to arrive whole, however slowly they come")
    p.add_argument("--body-timeout", type=seconds, default=d.body_timeout,
                   help="seconds a request's body may take to arrive; then HTTP 408")
    p.add_argument("--idle-timeout", type=seconds, default=d.idle_timeout,
                   help="seconds a kept-alive connection may wait for its next request, or an answer for its reader")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API (needs the serve extra)")
    p.add_argument("run", metavar="RUN", help="the run dir to serve; its folder name is the model id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000,
                   help="TCP port to listen on (0: a free one the system chooses, printed in the first line)")
    add_checkpoint(p)
    add_limits(p)
    add_compile(p, default=True, why="built in the background at the first start of a checkpoint (a minute or "
                "more, decoding eagerly meanwhile) and kept on disk for the next; decoding runs several times faster")
    p.add_argument("--threads", type=count(0), default=0,
                   help="CPU threads of the decode step, at most the cores; 0: chosen from the load on them, one fewer "
                   "than the cores at most, leaving one to the HTTP side")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME", type=model_name,
                   help="the model id(s) clients ask for, the first answering (default: the run folder's name)")
    p.add_argument("--api-key", default=os.environ.get("LMLAB_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health and /metrics (default: "
                   "$LMLAB_API_KEY; none)")
    p.add_argument("--insecure", action="store_true",
                   help="allow serving beyond loopback (--host 0.0.0.0, ...) without an API key")
    p.add_argument("--drain-seconds", type=within(0, 86_400), default=10.0,
                   help="on SIGTERM/SIGINT, how long running requests may go on before each is ended")
    add_device(p)

    p = sub.add_parser("answer", help="answer every Alpaca record with a run's model, for `lmlab judge`")
    p.add_argument("run", metavar="RUN", help="the run dir whose model answers")
    p.add_argument("--data", required=True, help="JSON list of {instruction, input, output} records")
    p.add_argument("--out", required=True, type=destination("--out", "file"),
                   help="JSON-lines file to write (instruction, input, output, model_answer)")
    add_sampling(p, max_new_tokens=256, temperature=0.0)
    p.add_argument("--batch-size", type=count(), default=16, help="instructions answered together")
    add_compile(p, default=False, why="built once for a checkpoint, a minute or more, and kept on disk for the next "
                "calls; worth it for a few hundred answers or more")
    add_checkpoint(p)
    add_device(p)

    p = sub.add_parser("judge", help="score answers 0-100 with a judge model behind an OpenAI-compatible endpoint")
    p.add_argument("--answers", required=True, help="JSON-lines file written by `lmlab answer`")
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1 (key: $OPENAI_API_KEY)")
    p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    p.add_argument("--out", type=destination("--out", "file"),
                   help="per-item scores, JSON lines (default: ANSWERS-judged.jsonl)")
    p.add_argument("--max-tokens", type=count(), default=16, help="longest judge reply read")
    p.add_argument("--lowest", type=count(0), default=5, help="how many of the lowest-scored answers to show")
