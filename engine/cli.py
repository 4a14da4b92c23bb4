"""``lookalike``: a thin layer over engine functions. Every option is a config key (``--set``)."""
from __future__ import annotations

import argparse
import json
import sys

from engine import config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required, default=None,
                   help="YAML config (default: the embedded configs/local.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any config key, e.g. --set embed.batch_size=64 (repeatable)")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper, default=None,
                   help="same as --set log.level=LEVEL")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="same as --set log.format=FORMAT; json: one object per line with run_id and stage")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lookalike", description="Visual similarity search for product catalogs.")
    ap.add_argument("--version", action="version", version=f"lookalike {version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample catalog -> pipeline -> service on 127.0.0.1 -> example queries")
    _common(demo)
    demo.add_argument("--products", type=int, default=2000, help="sample catalog size (1..10000)")
    demo.add_argument("--queries", type=int, default=500, help="products queried for precision@10")
    demo.add_argument("--port", type=int, default=None, help="same as --set serve.port=N")
    demo.add_argument("--keep-serving", action="store_true", help="leave the service up until Ctrl-C")
    run = sub.add_parser("run", help="one pipeline run; exit 0 only when an index was validated and published")
    _common(run)
    run.add_argument("--full", action="store_true", help="recompute every row (same as --set plan.full=true)")
    cmp = sub.add_parser("compact", help="merge small and mostly-dead feature files now; publishes the result")
    _common(cmp)
    upd = sub.add_parser("update", help="delta run over new or changed rows (--set source.path=...); publishes "
                                        "delta shards beside the index in minutes")
    _common(upd)
    dele = sub.add_parser("delete", help="tombstone product ids in the published index; the service drops them "
                                         "within serve.poll_interval_s")
    dele.add_argument("ids", nargs="*", metavar="ID", help="product ids to delete")
    dele.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                      help="a file of product ids, one per line ('-': stdin)")
    _common(dele)
    srv = sub.add_parser("serve", help="the search service on the last published index")
    _common(srv)
    val = sub.add_parser("validate", help="validate a built index version; non-zero exit when it fails")
    val.add_argument("uri", help="<storage root>/indexes/<model_version>[/<index_version>] (default: LATEST)")
    _common(val)
    return ap


def version() -> str:
    """The installed package's version (pyproject.toml), with the Ray it runs on."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        ours = dist_version("lookalike")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    try:
        return f"{ours} (ray {dist_version('ray')})"
    except PackageNotFoundError:
        return ours


def overrides(args, *more: str) -> list[str]:
    """--set, then the flags that are shorthands for config keys."""
    flags = [f"log.level={args.log_level}"] * bool(args.log_level) + [f"log.format={args.log_format}"] * bool(
        args.log_format)
    return args.overrides + list(more) + flags


def load(args, *more: str) -> config.Config:
    """The command's config; the log is set up from it (log.level, log.format)."""
    from engine import logs

    cfg = config.load(args.config, overrides(args, *more))
    logs.setup(cfg.log.level, cfg.log.format)
    return cfg


def cmd_demo(args) -> int:
    from engine import demo

    port = [f"serve.port={args.port}"] if args.port else []
    load(args, *port)
    result = demo.run(args.products, args.keep_serving, args.config, overrides(args, *port), queries=args.queries)
    if not args.keep_serving:
        import ray

        ray.shutdown()  # before the summary, so Ray's shutdown chatter cannot follow it
        print(json.dumps(result), flush=True)
    return EXIT_OK


def cmd_run(args) -> int:
    from engine import pipeline, report

    cfg = load(args, *(["plan.full=true"] if args.full else []))
    try:
        rep = pipeline.run(cfg)
    except pipeline.RunFailed as exc:
        if exc.report:
            print(report.summary(exc.report))
        print(f"lookalike run: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(report.summary(rep))
    return EXIT_OK


def cmd_compact(args) -> int:
    from engine import pipeline

    cfg = config.load(args.config, args.overrides)
    try:
        rep = pipeline.compact_store(cfg)
    except pipeline.RunFailed as exc:
        print(f"lookalike compact: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({k: rep.get(k) for k in ("status", "index_version", "compaction", "gc")}))
    return EXIT_OK


def cmd_update(args) -> int:
    from engine import pipeline

    cfg = load(args)
    try:
        rep = pipeline.update(cfg)
    except pipeline.RunFailed as exc:
        print(f"lookalike update: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({k: rep.get(k) for k in ("status", "index_version", "counts", "delta", "seconds")}))
    return EXIT_OK


def cmd_delete(args) -> int:
    from engine import tombstones
    from engine.storage import Storage

    cfg = load(args)
    ids = list(args.ids)
    if args.from_file:
        with (sys.stdin if args.from_file == "-" else open(args.from_file, encoding="utf-8")) as f:
            ids += [line.strip() for line in f if line.strip()]
    try:
        out = tombstones.delete(Storage.from_config(cfg.storage), cfg.embed.model_version, ids)
    except tombstones.TombstoneError as exc:
        print(f"lookalike delete: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(out))
    return EXIT_OK


def cmd_serve(args) -> int:
    from serve import app

    cfg = load(args)
    base = app.start(cfg)
    print(f"Serving {cfg.embed.model_version} on {base} (OpenAPI: {base}/docs); Ctrl-C to stop", flush=True)
    from engine.demo import _block

    _block()
    return EXIT_OK


def cmd_validate(args) -> int:
    from engine import validate

    cfg = load(args)
    try:
        from engine.storage import gcs_options

        result = validate.validate_uri(args.uri, cfg.index.validate_, gcs_options(cfg.storage))
    except ValueError as exc:
        print(f"lookalike validate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result, indent=2))
    return EXIT_OK if result["ok"] else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    from engine import logs

    args = parser().parse_args(argv)
    logs.setup(args.log_level or "INFO", args.log_format or "text")  # until the config says otherwise
    try:
        return {"demo": cmd_demo, "run": cmd_run, "compact": cmd_compact, "update": cmd_update,
                "delete": cmd_delete, "serve": cmd_serve, "validate": cmd_validate}[args.command](args)
    except config.ConfigError as exc:
        print(f"lookalike {args.command}: config error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
