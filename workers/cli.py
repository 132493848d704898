"""``tickwire``: one console script, one subcommand per job.

Bad arguments give one line on stderr and exit code 2. Each subcommand imports what it
needs when it runs, so ``tickwire --help`` stays fast and a worker process loads only its
own code.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

WORKERS: dict[str, str] = {
    # worker name -> module whose main() runs it
    "candle-ingest": "workers.candle_ingest.app",
    "feature-builder": "workers.feature_builder.app",
    "model-scorer": "workers.model_scorer.app",
    "signal-publisher": "workers.signal_publisher.app",
    "timescale-replicator": "workers.timescale_replicator.app",
    "scheduler": "workers.trainer.scheduler",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class Refused(SystemExit):
    """Exit code 2 after one line on stderr, which ``message`` holds for a caller that
    runs a command as a function (the scheduler's training job)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def fail(message: str) -> NoReturn:
    """Stop with one line and exit code 2."""
    sys.stderr.write(f"tickwire: {message}\n")
    raise Refused(message)


def _run_worker(args: argparse.Namespace) -> int:
    module_name = WORKERS[args.worker]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            fail(f"worker {args.worker!r} is not built yet")
        raise
    main: Callable[[], int | None] = module.main
    return main() or 0


def _stack(args: argparse.Namespace) -> int:
    from infra.stack import DEFAULT_STACK_DIR, serve

    return serve(args.dir or DEFAULT_STACK_DIR)


def _db(args: argparse.Namespace) -> int:
    from db.migrate import run

    return run(args.action, args.dsn)


def _contracts(args: argparse.Namespace) -> int:
    if args.action == "export":
        from contracts.schemas import SCHEMA_DIR, export

        for path in export(args.dir or SCHEMA_DIR):
            print(path)
        return 0
    from contracts.asyncapi import DOCUMENT, render

    out: Path = args.out or DOCUMENT
    out.write_text(render())
    print(f"wrote {out}")
    return 0


def _streams(args: argparse.Namespace) -> int:
    from contracts.streams import ConsumerSpec, consumer_specs, ensure, stream_specs
    from workers.runtime.connection import connect_once
    from workers.runtime.partition import PARTITIONED, floors_of, partition_specs, placed
    from workers.runtime.settings import RuntimeSettings, load

    settings = load(RuntimeSettings, namespace=args.namespace)
    notes: dict[str, str] = {}
    told = dict(args.partitions)

    async def go() -> dict[str, str]:
        try:
            nc = await connect_once(settings, "tickwire-streams")
        except (TimeoutError, OSError) as exc:
            fail(f"streams: NATS at {settings.nats_url} did not answer: {exc or 'timed out'}")
        js = nc.jetstream()
        try:
            specs = consumer_specs(namespace=args.namespace)
            report = await ensure(
                js,
                stream_specs(namespace=args.namespace, replicas=args.replicas or 1),
                rescale=args.replicas is not None,
            )
            # (spec, its worker if that may run as partitions, made only if it runs alone)
            wanted: list[tuple[ConsumerSpec, str | None, bool]] = []
            for c in specs:
                if c.durable not in PARTITIONED:
                    wanted.append((c, None, False))
                elif c.durable not in told:
                    wanted.append((c, c.durable, True))
            for worker, n in told.items():
                wanted += [(c, worker, False) for c in partition_specs(specs, worker, n)]
            consumers = []
            inputs = {c.stream for c, worker, _ in wanted if worker is not None}
            floors = {stream: await floors_of(js, stream) for stream in inputs}
            for spec, worker, alone in wanted:
                if worker is not None:  # placed among the worker's durables of any layout
                    spec, why = placed(spec, worker, floors[spec.stream])
                    if alone and spec.start_seq is not None:
                        notes[spec.label] = (
                            f"not made: {worker} runs as partitions "
                            f"(--partitions {worker}=1 makes it again)"
                        )
                        continue
                    if why:
                        notes[spec.label] = f"stale: {why}"
                consumers.append(spec)
            return report | await ensure(js, [], consumers)
        finally:
            await nc.close()

    for name, outcome in asyncio.run(go()).items():
        print(f"{name:40} {outcome}")
    for name, note in notes.items():
        print(f"{name:40} {note}")
    return 0


def _partitions(text: str) -> tuple[str, int]:
    from workers.runtime.partition import PARTITIONED

    worker, _, count = text.partition("=")
    if worker not in PARTITIONED:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected WORKER=N, WORKER one of {', '.join(PARTITIONED)}"
        )
    n = int(count) if count.isdigit() else 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: N must be a whole number from 1 to 64")
    return worker, n


def _permissions(args: argparse.Namespace) -> int:
    from workers.permissions import ACCOUNTS, PermissionsError, partitioned_block
    from workers.runtime.partition import PARTITIONED

    if args.worker not in PARTITIONED:
        fail(f"{args.worker!r} does not run as partitions: one of {', '.join(PARTITIONED)}")
    path: Path = args.accounts or ACCOUNTS
    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    try:
        sys.stdout.write(partitioned_block(text, args.worker, args.partitions))
    except PermissionsError as exc:
        fail(f"{path}: {exc}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from workers.candle_ingest.importer import main

    return main([args.kind, *args.rest])


def _ea_sim(args: argparse.Namespace) -> int:
    from workers.ea_sim.app import main

    return main(args.rest)


def _status(args: argparse.Namespace) -> int:
    from workers.status import main

    return main()


def _dlq(args: argparse.Namespace) -> int:
    from workers.dlq import run

    return run(args)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1: {text!r}")
    return value


def _two_or_more(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 2 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 2 to 64, not {text!r}")
    return value


def _models(args: argparse.Namespace) -> int:
    from workers.registry.cli import run

    return run(args)


def _train(args: argparse.Namespace) -> int:
    from workers.trainer.cli import run

    return run(args)


def _replay(args: argparse.Namespace) -> int:
    from workers.replay import run

    return run(args)


def _rebuild(args: argparse.Namespace) -> int:
    from workers.rebuild.app import run

    return run(args)


def _subscribers(args: argparse.Namespace) -> int:
    from workers.signal_publisher.cli import run

    return run(args)


def _subscribe(args: argparse.Namespace) -> int:
    from workers.signal_publisher.cli import subscribe

    return subscribe(args)


def _gain(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
    return value


def _up(args: argparse.Namespace) -> int:
    from workers.up import run

    return run(args)


def _worker_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in WORKERS for n in names):
        raise argparse.ArgumentTypeError(f"want some of {','.join(WORKERS)}: {text!r}")
    return list(dict.fromkeys(names))


def _demo(args: argparse.Namespace) -> int:
    from workers.demo import main

    return main(keep=args.keep, base_port=args.base_port)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tickwire", description="MT5 ticks in, signals out, over NATS JetStream.")
    p.add_argument(
        "--log-level",
        default=os.environ.get("TICKWIRE_LOG_LEVEL", "INFO").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run one worker in this process until SIGTERM")
    run.add_argument("worker", choices=sorted(WORKERS))
    run.set_defaults(func=_run_worker)

    stack = sub.add_parser(
        "stack", help="run NATS, PostgreSQL and QuestDB on free loopback ports until Ctrl-C"
    )
    stack.add_argument(
        "--dir", type=Path, help="private directory for data and logs (default .stack/local)"
    )
    stack.set_defaults(func=_stack)

    db = sub.add_parser("db", help="PostgreSQL migrations: apply them, or list their state")
    db.add_argument("action", choices=["migrate", "status"])
    db.add_argument("--dsn", help="PostgreSQL DSN (default: $TICKWIRE_POSTGRES_DSN)")
    db.set_defaults(func=_db)

    contracts = sub.add_parser("contracts", help="write the JSON Schemas or the AsyncAPI document")
    contracts.add_argument("action", choices=["export", "asyncapi"])
    contracts.add_argument("--dir", type=Path, help="schemas directory (export)")
    contracts.add_argument("--out", type=Path, help="document path (asyncapi)")
    contracts.set_defaults(func=_contracts)

    streams = sub.add_parser("streams", help="create or update JetStream streams and consumers")
    streams.add_argument("action", choices=["ensure"])
    streams.add_argument("--namespace", default=None)
    streams.add_argument(
        "--replicas",
        type=int,
        default=None,
        choices=[1, 3, 5],
        help="set every stream to this many replicas (default: new streams R1, others kept)",
    )
    streams.add_argument(
        "--partitions",
        type=_partitions,
        action="append",
        default=[],
        metavar="WORKER=N",
        help="WORKER runs as N partitions (durables WORKER-<k>ofN; 1: WORKER alone); repeatable",
    )
    streams.set_defaults(func=_streams)

    perms = sub.add_parser(
        "nats-permissions",
        help="a worker's NATS permissions block, allowing the consumers of N partitions",
    )
    perms.add_argument(
        "worker", help="candle-ingest, feature-builder, model-scorer or signal-publisher"
    )
    perms.add_argument("--partitions", type=_two_or_more, required=True, help="N (2 to 64)")
    perms.add_argument(
        "--accounts", type=Path, help="accounts file to read (infra/nats/accounts.conf)"
    )
    perms.set_defaults(func=_permissions)

    imp = sub.add_parser("import", help="backfill from MT5 CSV exports (bars or ticks)")
    imp.add_argument("kind", choices=["mt5-bars", "mt5-ticks"])
    imp.add_argument("rest", nargs="*")
    imp.set_defaults(func=_import)

    # its options are taken whole by main(), in order, for its own parser
    ea_sim = sub.add_parser(
        "ea-sim", add_help=False, help="publish ticks as MT5 EAs would: simulated or a CSV replay"
    )
    ea_sim.set_defaults(func=_ea_sim, rest=[])

    status = sub.add_parser(
        "status", help="streams, consumers and their lag, worker health, active models"
    )
    status.set_defaults(func=_status)

    dlq = sub.add_parser("dlq", help="dead letters: list, show, requeue, purge")
    dsub = dlq.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dlist = dsub.add_parser("list", help="dead letters counted per worker and reason")
    dshow = dsub.add_parser("show", help="one dead letter, payload pretty-printed")
    dshow.add_argument("seq", type=_positive, help="its sequence in the DLQ stream")
    requeue = dsub.add_parser(
        "requeue", help="publish back to the original subject, then delete the dead letter"
    )
    requeue.add_argument("seq", type=_positive, nargs="?", help="one dead letter")
    requeue.add_argument("--payload-file", type=Path, help="the fixed payload to send instead")
    requeue.add_argument("--limit", type=_positive, help="at most this many (with --worker)")
    purge = dsub.add_parser("purge", help="delete a worker's dead letters (of one reason)")
    purge.add_argument("--yes", action="store_true", help="do not ask")
    for action, worker_required in ((dlist, False), (requeue, False), (purge, True)):
        action.add_argument("--worker", required=worker_required)
        action.add_argument("--reason")
    for action in (dlist, dshow, requeue, purge):
        action.add_argument("--namespace", help="a replay namespace's dead letters")
    dlq.set_defaults(func=_dlq)

    models = sub.add_parser("models", help="the model registry: list, show, promote, rollback")
    msub = models.add_subparsers(dest="action", required=True, parser_class=_Parser)
    mlist = msub.add_parser("list", help="stored models as a table")
    for flag in ("--feed", "--symbol", "--tf"):
        mlist.add_argument(flag)
    msub.add_parser("show", help="one model's card").add_argument("version")
    promote = msub.add_parser("promote", help="make a model active if it beats the active one")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="skip the promotion gate")
    promote.add_argument("--metric", default="auc", help="metric the gate compares")
    promote.add_argument("--min-gain", type=_gain, default=0.0, help="gain needed to promote")
    rollback = msub.add_parser("rollback", help="make the previously active model active again")
    for flag in ("--feed", "--symbol", "--tf"):
        rollback.add_argument(flag, required=True)
    models.set_defaults(func=_models)

    train = sub.add_parser(
        "train", help="walk-forward LightGBM on stored candles; the model into the registry"
    )
    train.add_argument("--feed", required=True)
    train.add_argument("--symbol", required=True)
    train.add_argument("--tf", required=True, help="timeframe: M1, M5 .. D1")
    train.add_argument("--from", dest="start", required=True, help="ISO time, UTC if naive")
    train.add_argument("--to", dest="end", required=True, help="ISO time, end exclusive")
    train.add_argument("--horizon", type=int, default=12, help="label horizon in bars")
    train.add_argument("--folds", type=int, default=4, help="walk-forward folds")
    train.add_argument("--out", type=Path, default=Path("train-report"), help="report dir")
    train.add_argument("--promote", action="store_true", help="promote if it beats the active")
    train.set_defaults(func=_train)

    replay = sub.add_parser("replay", help="copy a range of a live stream into a namespace")
    rsub = replay.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = rsub.add_parser("create", help="copy a time range into namespace NAME")
    create.add_argument("name")
    create.add_argument("--stream", required=True, help="TICKS, CANDLES, FEATURES, ...")
    create.add_argument("--from", dest="start", required=True, help="ISO time, UTC if naive")
    create.add_argument("--to", dest="end", required=True, help="ISO time, end exclusive")
    create.add_argument("--feed", help="only this feed")
    create.add_argument("--symbols", nargs="+", help="only these symbols of --feed")
    rsub.add_parser("list", help="every replay namespace")
    rsub.add_parser("delete", help="remove every trace of a replay").add_argument("name")
    rsub.add_parser(
        "diff", help="compare a replay's candles, features, scores, signals with live"
    ).add_argument("name")
    replay.set_defaults(func=_replay)

    rebuild = sub.add_parser(
        "rebuild", help="reprocess stored features, scores, signals of a range, in place"
    )
    rebuild.add_argument(
        "--from", dest="start", required=True, help="ISO time or epoch ms (13 digits)"
    )
    rebuild.add_argument("--to", dest="end", help="ISO time or epoch ms (13 digits), end exclusive")
    rebuild.add_argument(
        "--stages", required=True, help="features,scores,signals or a contiguous part of it"
    )
    rebuild.add_argument("--feed", help="only this feed")
    rebuild.add_argument("--symbols", nargs="+", help="only these symbols")
    rebuild.add_argument("--namespace", help="a replay namespace's streams instead of live ones")
    rebuild.set_defaults(func=_rebuild)

    subs = sub.add_parser("subscribers", help="signal subscribers' durable consumers")
    ssub = subs.add_subparsers(dest="action", required=True, parser_class=_Parser)
    sadd = ssub.add_parser("add", help="a durable consumer on SIGNALS for a new subscriber")
    sadd.add_argument("name")
    sadd.add_argument("--filter", help="signals subject filter, e.g. signals.*.EURUSD.M5")
    ssub.add_parser("list", help="subscribers with what they have not acked yet")
    ssub.add_parser("remove", help="delete a subscriber's consumer").add_argument("name")
    rewind = ssub.add_parser("rewind", help="deliver one subscriber's signals again from a time")
    rewind.add_argument("name")
    rewind.add_argument(
        "--from", dest="start", required=True, help="ISO time or epoch ms (13 digits)"
    )
    subs.set_defaults(func=_subscribers)

    subscribe = sub.add_parser("subscribe", help="reference subscriber: print and ack signals")
    subscribe.add_argument("name")
    subscribe.set_defaults(func=_subscribe)

    up = sub.add_parser("up", help="every worker as a child process, until Ctrl-C or SIGTERM")
    up.add_argument("--namespace", help="run in this replay namespace (see tickwire replay list)")
    up.add_argument("--workers", type=_worker_names, help="a comma-separated subset")
    up.add_argument("--base-port", type=int, default=9101, help="first metrics port (9101)")
    up.add_argument("--log-dir", type=Path, default=Path(".stack/logs"), help="worker logs")
    up.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to become healthy")
    up.set_defaults(func=_up)

    demo = sub.add_parser("demo", help="the main job, end to end, on a local stack")
    demo.add_argument("--keep", action="store_true", help="keep the stack running afterwards")
    demo.add_argument("--base-port", type=int, default=9101, help="first metrics port (9101)")
    demo.set_defaults(func=_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # the command is the first word that is not --log-level or its value
    words = [i for i, a in enumerate(argv) if not a.startswith("-")]
    at = next((i for i in words if i == 0 or argv[i - 1] != "--log-level"), None)
    extra: list[str] = []
    if at is not None and argv[at] == "ea-sim":  # all after it, in order, even "-5", "--help"
        args = parser.parse_args(argv[: at + 1])
        args.rest = argv[at + 1 :]
    else:
        # `import` hands its options to the importer's own parser
        args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = [*args.rest, *extra]
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
