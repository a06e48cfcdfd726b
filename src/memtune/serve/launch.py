"""Starting `memtune serve`: the engine for a base model or a run, its adapters, uvicorn on a socket.

    memtune serve --model BASE [--adapters name=DIR ...] [--adapter-dir DIR] [key=value ...]
    memtune serve RUN_DIR [--adapters ...]       the run's base, its adapter named after the run

The engine is built and run in a child process (engine_process.py; `--engine-in-process` keeps it on
a thread here). The listening socket is bound before uvicorn starts, so the printed address is the real one (also
with --port 0). uvicorn handles SIGINT / SIGTERM: it stops accepting, lets in-flight requests finish
for --shutdown-timeout seconds, then the app's shutdown aborts whatever still runs (streams end with
an error event) and joins the engine thread.
"""

from __future__ import annotations

import functools
import signal
import socket
import sys
from pathlib import Path

from ..errors import ConfigError
from ..recipe import build_recipe
from .engine import Engine, EngineConfig
from .engine_thread import EngineThread
from .run_model import engine_for, target_recipe


def parse_adapters(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapters {item!r}: expected NAME=DIR")
        if name in out:
            raise ConfigError(f"--adapters: '{name}' is given twice")
        out[name] = path
    return out


def scan_adapter_dir(root: str) -> dict[str, str]:
    """Every subdirectory of root holding an adapter_config.json, named after the subdirectory."""
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"--adapter-dir {root}: not a directory")
    return {d.name: str(d) for d in sorted(path.iterdir()) if (d / "adapter_config.json").is_file()}


def build_engine(run_dir: str | None, model: str | None, overrides: list[str],
                 config: EngineConfig) -> tuple[Engine, str, str, dict[str, str]]:
    """(engine, base name, base root, adapters already registered by the run)."""
    if run_dir and model:
        raise ConfigError("serve: give a run directory or --model, not both")
    if run_dir:
        recipe, artifact = target_recipe(run_dir, overrides)
        name = Path(run_dir).resolve().name
        engine, adapter = engine_for(recipe, artifact, config, adapter_name=name)
        registered = {adapter: str(artifact)} if adapter else {}
        return engine, recipe.model, recipe.model, registered
    if not model:
        raise ConfigError("serve: give a run directory or --model BASE")
    recipe = build_recipe({"model": model}, [*overrides, "adapter.kind=none"])
    engine, _ = engine_for(recipe, None, config)
    return engine, model, model, {}


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serving_engine(run_dir: str | None, model: str | None, overrides: list[str], config: EngineConfig,
                   adapters: dict[str, str], served_name: str | None) -> Engine:
    """The engine `memtune serve` runs, with every adapter registered; `engine.served` = (base name, root).
    Module-level, so the engine process can build it from its arguments."""
    engine, base_name, base_root, registered = build_engine(run_dir, model, overrides, config)
    base_name = served_name or base_name
    for name, path in adapters.items():
        if name == base_name:
            raise ConfigError(f"--adapters: '{name}' is the base model's name")
        engine.add_adapter(name, path)
    engine.served = (base_name, base_root)
    return engine


def serve(ns) -> int:
    import uvicorn

    from .engine_process import EngineProcess
    from .server import ServerOptions, create_app, resolve_roots

    config = EngineConfig(pool_mib=ns.pool_mib, page_tokens=ns.page_tokens, max_running=ns.max_running,
                          max_prefill_tokens=ns.max_batch_tokens, max_adapters=ns.max_adapters_per_batch,
                          max_resident_adapters=ns.max_resident_adapters, lora_kernel=ns.lora_kernel)
    config.check()
    adapters = parse_adapters(ns.adapters or [])
    if ns.adapter_dir:
        adapters = {**scan_adapter_dir(ns.adapter_dir), **adapters}
    roots = resolve_roots(ns.adapter_root or ([ns.adapter_dir] if ns.adapter_dir else []))
    if ns.enable_adapter_loading and not roots:
        raise ConfigError("--enable-adapter-loading: give --adapter-root DIR (or --adapter-dir), the directory "
                          "run-time adapter paths must stay inside")
    factory = functools.partial(serving_engine, ns.run_dir, ns.model, ns.overrides, config, adapters,
                                ns.served_model_name)
    if ns.engine_in_process:
        engine = factory()
        thread = EngineThread(engine, max_queue=ns.max_queue)
        served, mem, device = engine.served, engine.memory(), engine.device
    else:  # the default: the engine in a process of its own (engine_process.py says why)
        thread = EngineProcess(factory, max_queue=ns.max_queue)
        thread.start()
        served, mem, device = thread.info["served"], thread.info["memory"], thread.info["device"]
    base_name, base_root = served
    names = sorted(thread.adapters())
    app = create_app(thread, ServerOptions(base_name, base_root, ns.enable_adapter_loading, roots))
    sock = bind(ns.host, ns.port)
    host, port = sock.getsockname()[:2]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    print(f"memtune serve: {base_name} ({mem['weights'] / 2**20:.1f} MiB of weights, pool {mem['pool'] / 2**20:.1f} "
          f"MiB on {device}) with {len(names)} adapter(s){': ' + shown if names else ''}", flush=True)
    print(f"listening on http://{host}:{port} (OpenAI API under /v1; Ctrl-C stops)", flush=True)
    # the stdlib event loop and h11 whatever extras are installed (uvicorn would pick uvloop / httptools when
    # present): the same server on every machine, and the faster of the two on serve_load.py (BENCHMARKS.md)
    server = uvicorn.Server(uvicorn.Config(app, log_level=ns.log_level, timeout_graceful_shutdown=ns.shutdown_timeout,
                                           lifespan="on", loop="asyncio", http="h11"))
    caught: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # uvicorn catches the signal, shuts down gracefully, then raises it again for the handler it
        # found installed; this one records it, so the command returns 0 instead of dying of it
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    server.run(sockets=[sock])
    why = f" ({signal.Signals(caught[0]).name})" if caught else ""
    print(f"memtune serve: stopped{why}", file=sys.stderr, flush=True)
    return 0
