"""`mllmeraser serve` (an OpenAI-compatible chat server applying erasers per request; the serve extra) and
`mllmeraser serve-log` (its audit log; standard library only)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserInputError
from .flags import Flag, add_settings_flags, settings_from_args
from .options import add_cache_args, add_forget_ratio_arg, add_model_arg, cache_dir, load_model

LIMIT_FLAGS = {  # what Limits' fields do not say about their flags
    "max_tokens": Flag(name="max-tokens-limit", help="largest max_tokens"),
    "max_prompt_chars": Flag(help="every message's text together, in characters"),
    "max_prompt_tokens": Flag(help="the chat prompt's text tokens (image tokens aside)"),
    "max_image_bytes": Flag(help="a decoded data: URL"),
    "max_image_pixels": Flag(help="width x height"),
    "max_eraser_bytes": Flag(help="an eraser uploaded to POST /admin/erasers"),
}


def add_parsers(commands) -> None:
    from ..serve.settings import Limits, ServeSettings  # no web framework needed to build the parser

    serve = commands.add_parser("serve", help="an OpenAI-compatible chat server applying erasers per request "
                                "(needs the serve extra)")
    add_model_arg(serve)
    serve.add_argument("--erasers", type=Path, default=None, help="the server's state directory: the erasers its "
                       "manifest.json names (a directory without one: every .safetensors in it, each named by its "
                       "file stem, then a manifest is written), tenant bindings and the audit log; every admin change "
                       "is written there before it is acknowledged (docs/serving.md)")
    serve.add_argument("--tenants", type=Path, default=None, help='JSON {"api key": ["eraser name", ...]}: each '
                       "key gets its erasers (and cannot switch them off); any other key is refused (401); with "
                       "--erasers, keys new to its manifest are added there")
    serve.add_argument("--admin-token", default=None, help="token for POST/DELETE /admin/erasers "
                       "(default: $MLLMERASER_ADMIN_TOKEN; neither: the admin endpoints are off)")
    serve.add_argument("--data", type=Path, default=None, help="MLLMU-Bench directory: with it the server fits "
                       "deletion requests itself (POST /admin/requests) from the model cache of its retain, erasure "
                       "and calibration sets (built at start-up if missing); fitted erasers are saved to --erasers")
    add_forget_ratio_arg(serve)
    add_cache_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", default=None, help="the model id clients send (default: the --model "
                       "directory's name)")
    serve.add_argument("--max-batch", type=int, default=ServeSettings.max_batch, help="rows per forward pass")
    serve.add_argument("--max-wait-ms", type=float, default=ServeSettings.max_wait * 1000,
                       help="how long the oldest waiting request waits for a batch to fill")
    add_settings_flags(serve, Limits, LIMIT_FLAGS)
    serve.set_defaults(handler=run_serve)

    serve_log = commands.add_parser("serve-log", help="the audit log of a server's deletion requests")
    serve_log.add_argument("directory", type=Path, help="the server's --erasers directory (or its audit.jsonl)")
    serve_log.add_argument("--name", default=None, help="only this request's events")
    serve_log.add_argument("--json", action="store_true", help="the raw JSON lines (as jq reads them)")
    serve_log.set_defaults(handler=run_serve_log)


def run_serve(args) -> int:
    try:
        import uvicorn

        from .. import serve
    except ImportError as exc:
        raise UserInputError(None, f"serve needs the serve extra ({exc.name} is missing): "
                             'pip install "mllmeraser[serve]"') from None
    store = None
    if args.erasers is not None:  # the manifest (and the tenants file) are checked before the model loads
        store = serve.Store.open(args.erasers, args.tenants)
        for stray in store.strays:
            print(f"{args.erasers}: {stray} is not in the manifest (an add or delete cut short); moved to "
                  f"{serve.store.DELETED_DIR}/", flush=True)
        erasers, tenants = store.load_erasers(), store.tenants
    else:
        erasers = {}
        tenants = serve.read_tenants(args.tenants, erasers) if args.tenants is not None else None
    model, processor = load_model(args)
    try:
        registry = serve.Registry(erasers, model, tenants)
    except serve.PolicyError as exc:  # an eraser fitted for another model, or one that cannot stack with the rest
        raise UserInputError(args.erasers, exc.message) from None
    limits = settings_from_args(serve.Limits, args, LIMIT_FLAGS)
    settings = serve.ServeSettings(model_name=args.model_name or Path(str(args.model).rstrip("/")).name,
                                   admin_token=args.admin_token or os.environ.get("MLLMERASER_ADMIN_TOKEN") or None,
                                   limits=limits, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000)
    fitter = None
    if args.data is not None:  # the model cache: loaded, or built once here, before the first request arrives
        fitter = serve.RequestFitter.from_data(model, processor, args.data, args.forget_ratio,
                                               cache_dir=cache_dir(args))  # the store saves what it fits
        print(f"fitting deletion requests (POST /admin/requests); model cache: {fitter.shared.source}", flush=True)
    app = serve.create_app(model, processor, registry, settings, fitter, store)
    print(f"serving {settings.model_name} with erasers {registry.names()} on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run_serve_log(args) -> int:
    import json

    from ..serve.audit import AUDIT_FILE, format_table, read_audit  # standard library only: no serve extra needed

    records = [r for r in read_audit(args.directory) if args.name is None or r.get("name") == args.name]
    if args.json:
        for record in records:
            print(json.dumps(record))
    elif records:
        print(format_table(records))
    else:
        where = args.directory / AUDIT_FILE if args.directory.is_dir() else args.directory
        print(f"no events{f' for {args.name!r}' if args.name else ''} in {where}")
    return 0
