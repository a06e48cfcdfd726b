"""The `memtune` command: train, plan, eval, merge, quantize, replay, demo, env.

User errors (MemtuneError) print one line, `memtune: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import MemtuneError


def _split_target(args: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml | RUN_DIR] [key=value ...]: the first argument without '=' is the target."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    bad = [a for a in args if "=" not in a]
    if bad:
        raise MemtuneError(f"unexpected argument '{bad[0]}' (overrides look like key=value)")
    return None, args


def cmd_train(ns) -> int:
    from .recipe import load_recipe
    from .train import train

    target, overrides = _split_target(ns.args)
    summary = train(load_recipe(target, overrides), resume=ns.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports for the job
        return 0
    out = {"output_dir": summary["recipe"]["output_dir"], "steps": summary["train"]["steps"],
           "loss_first": summary["train"]["loss_first"], "loss_last": summary["train"]["loss_last"],
           "eval": summary["eval"], "params": summary["params"], "memory_bytes": summary["memory_bytes"]}
    print(json.dumps(out, indent=2))
    return 0


def cmd_plan(ns) -> int:
    from .memory.plan import GIB, format_report, largest_fitting, parse_memory, plan
    from .recipe import load_recipe

    target, overrides = _split_target(ns.args)
    recipe = load_recipe(target, overrides)
    budget, gpu = parse_memory(ns.gpu_memory) if ns.gpu_memory else (None, None)
    device = ns.device or ("cuda" if budget is not None else "cpu")
    if ns.max_batch or ns.max_seq:
        if budget is None:
            raise MemtuneError("--max-batch / --max-seq: need a budget (--gpu-memory 24GiB or a GPU name)")
        axis = "batch" if ns.max_batch else "seq"
        n, rep = largest_fitting(recipe, axis, budget, batch_size=ns.batch, seq_len=ns.seq, device=device, gpu=gpu,
                                 ranks=ns.ranks)
        if rep is None:
            what = "batch 1" if axis == "batch" else "2 tokens"
            raise MemtuneError(f"nothing fits on {gpu or f'{budget / GIB:.2f} GiB'}: not even {what} "
                               f"(the weights alone are {plan_weights(recipe, device, gpu) / GIB:.2f} GiB)")
    else:
        rep = plan(recipe, batch_size=ns.batch, seq_len=ns.seq, device=device, budget=budget, gpu=gpu,
                   ranks=ns.ranks)
    if ns.json:
        out = rep.to_dict()
        if ns.max_batch or ns.max_seq:
            out["largest"] = {"axis": "batch" if ns.max_batch else "seq", "value": n}
        print(json.dumps(out, indent=2))
    else:
        if ns.max_batch or ns.max_seq:
            print(f"largest {'batch size' if ns.max_batch else 'sequence length'} that fits: {n}")
        print(format_report(rep))
    if rep.fits is False:
        where = gpu or f"{budget / GIB:.2f} GiB"
        raise MemtuneError(f"does not fit on {where}: needs {rep.total / GIB:.2f} GiB, short by "
                           f"{-rep.margin / GIB:.2f} GiB")
    return 0


def plan_weights(recipe, device: str, gpu: str | None) -> int:
    """Bytes of the model's weights under the recipe (a plan at the smallest batch)."""
    from .memory.plan import plan

    m = plan(recipe, batch_size=1, seq_len=2, device=device, gpu=gpu).memory_bytes
    return m["parameters"] + m["buffers"]


def cmd_eval(ns) -> int:
    from .evaluate import evaluate

    target, overrides = _split_target(ns.args)
    print(json.dumps(evaluate(target, overrides)))
    return 0


def cmd_merge(ns) -> int:
    from .merge import merge

    out = merge(ns.run_dir, ns.to, ns.overrides, requantize=ns.requantize)
    extra = {}
    if ns.requantize:
        report = json.loads((out / "requantize_report.json").read_text())
        extra = {k: v for k, v in report.items() if k != "per_layer"}
    print(json.dumps({"merged": str(out), **extra}))
    return 0


def cmd_quantize(ns) -> int:
    from .quantize import quantize_to_folder
    from .recipe import load_recipe

    target, overrides = _split_target(ns.args)
    if target is None:  # defaults for a bare command line (what trains later does not matter here)
        given = {o.split("=", 1)[0] for o in overrides}
        overrides = [d for d in ("quantize.kind=int4", "adapter.kind=none") if d.split("=")[0] not in given] + overrides
    print(json.dumps(quantize_to_folder(load_recipe(target, overrides), ns.to)))
    return 0


def cmd_replay(ns) -> int:
    from .replay import replay_run

    print(json.dumps(replay_run(ns.run_dir, ns.to)))
    return 0


def cmd_env(ns) -> int:
    from .env import collect, format_report

    fields = collect()
    print(json.dumps(fields, indent=2) if ns.json else format_report(fields))
    return 0


def _sampling(ns):
    from .serve.sampling import SamplingParams

    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                          seed=ns.seed, stop=ns.stop or [])


def _generator(ns):
    from .serve.engine import EngineConfig
    from .serve.run_model import TextGenerator

    return TextGenerator(ns.run_dir, ns.overrides, EngineConfig(pool_mib=ns.pool_mib))


def cmd_generate(ns) -> int:
    params = _sampling(ns)
    gen = _generator(ns)
    if ns.json:
        print(json.dumps({"text": gen.generate(ns.prompt, params), "path": gen.path, "why": gen.why or None}))
        return 0
    for piece in gen.stream(ns.prompt, params):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(ns) -> int:
    from .serve.run_model import chat_loop

    return chat_loop(_generator(ns), _sampling(ns))


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    p.add_argument("--pool-mib", type=float, default=256.0, help="engine memory for KV pages and adapters")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def cmd_serve(ns) -> int:
    from .serve.launch import serve

    ns.run_dir, ns.overrides = _split_target(ns.args)
    return serve(ns)


def cmd_demo(ns) -> int:
    from .demo import run_demo

    from .demo import METHODS, MORE_METHODS

    methods = list(METHODS) + list(MORE_METHODS) if ns.all else None
    run_demo(data=ns.data, eval_file=ns.eval, out_dir=ns.out, epochs=ns.epochs, max_examples=ns.max_examples,
             methods=methods)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memtune", description="Fine-tune transformer models inside a memory budget.")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train a recipe: memtune train [CONFIG.yaml] [key=value ...] [--resume]")
    t.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.set_defaults(fn=cmd_train)

    pl = sub.add_parser("plan", help="predict a recipe's memory before running it: memtune plan [CONFIG.yaml] "
                                     "[key=value ...] [--batch N] [--seq N] [--gpu-memory 24GiB | GPU]")
    pl.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    pl.add_argument("--batch", type=int, default=None, help="micro-batch size (default: train.batch_size)")
    pl.add_argument("--seq", type=int, default=None,
                    help="tokens per example (default: the recipe's data.train batches, or data.max_length)")
    pl.add_argument("--gpu-memory", default=None,
                    help="the budget: 24GiB, 48GB, 80G, or a GPU name (h100, a100-80gb, rtx4090, ...)")
    pl.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="the target (default: cuda with --gpu-memory, else cpu); --device cpu --gpu-memory N "
                         "checks a CPU run against N bytes of RAM")
    group = pl.add_mutually_exclusive_group()
    group.add_argument("--max-batch", action="store_true", help="search the largest batch size that fits")
    group.add_argument("--max-seq", action="store_true", help="search the largest sequence length that fits")
    pl.add_argument("--ranks", type=int, default=1,
                    help="plan rank 0 of N processes (distributed.strategy: ddp by default, or fsdp)")
    pl.add_argument("--json", action="store_true", help="one JSON object (memory_bytes as in summary.json)")
    pl.set_defaults(fn=cmd_plan)

    e = sub.add_parser("eval", help="evaluate a run or a recipe: memtune eval [RUN_DIR | CONFIG.yaml] [key=value ...]")
    e.add_argument("args", nargs="*", metavar="RUN_DIR | CONFIG.yaml | key=value")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("merge", help="merge a run's adapter into its base: memtune merge RUN_DIR --to DIR")
    m.add_argument("run_dir")
    m.add_argument("--to", required=True, help="output directory for the merged transformers model")
    m.add_argument("--requantize", choices=["nf4"], default=None,
                   help="lossy: quantize the merged weights to NF4 again and report the error it adds")
    m.add_argument("overrides", nargs="*", metavar="key=value")
    m.set_defaults(fn=cmd_merge)

    q = sub.add_parser("quantize", help="store a model as group-wise INT (round to nearest or GPTQ) for later "
                                        "runs: memtune quantize [CONFIG.yaml] key=value ... --to DIR")
    q.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    q.add_argument("--to", required=True, help="output directory; train over it with model=DIR (its storage is "
                                               "read from it)")
    q.set_defaults(fn=cmd_quantize)

    r = sub.add_parser("replay", help="rebuild a MeZO run's weights from its trajectory: memtune replay RUN_DIR --to DIR")
    r.add_argument("run_dir")
    r.add_argument("--to", required=True, help="output directory (receives adapter/ or model/ and recipe.yaml)")
    r.set_defaults(fn=cmd_replay)

    d = sub.add_parser("demo", help="full fine-tuning vs LoRA on pretrained MiniLM, side by side")
    d.add_argument("--data", help="labeled TSV/CSV/JSONL (e.g. SST-2 train.tsv); default: the bundled set")
    d.add_argument("--eval", help="labeled test file (default: bundled test set, or 20%% held out of --data)")
    d.add_argument("--out", default="runs/demo", help="where runs, demo.json and demo.png go")
    d.add_argument("--epochs", type=float, default=None, help="training epochs (default: 4 bundled, 1 with --data)")
    d.add_argument("--max-examples", type=int, default=None, help="use at most this many training examples (default with --data: 2000)")
    d.add_argument("--all", action="store_true", help="every method, not only the default rows")
    d.set_defaults(fn=cmd_demo)

    g = sub.add_parser("generate", help='text from a run: memtune generate RUN_DIR "prompt" [key=value ...]')
    g.add_argument("run_dir")
    g.add_argument("prompt")
    g.add_argument("--json", action="store_true", help="one JSON object: text, path (engine | plain), why")
    _sampling_args(g, 64)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="chat with a run (streaming, the tokenizer's chat template): memtune chat RUN_DIR")
    c.add_argument("run_dir")
    _sampling_args(c, 256)
    c.set_defaults(fn=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible server over the multi-adapter engine: memtune serve "
                                     "--model BASE [--adapters name=DIR ...] | memtune serve RUN_DIR")
    s.add_argument("args", nargs="*", metavar="RUN_DIR | key=value")
    s.add_argument("--model", help="base model: preset, local path or HF id (or serve a RUN_DIR)")
    s.add_argument("--adapters", nargs="*", metavar="NAME=DIR", help="LoRA adapters to serve, by name")
    s.add_argument("--adapter-dir", help="serve every adapter directory under DIR, named after its folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 = any free port (the real one is printed)")
    s.add_argument("--served-model-name", help="the `model` name of the base (default: --model as given)")
    s.add_argument("--pool-mib", type=float, default=1024.0, help="device memory for KV pages + resident adapters")
    s.add_argument("--page-tokens", type=int, default=16, help="tokens per KV page")
    s.add_argument("--max-running", type=int, default=32, help="requests decoding together")
    s.add_argument("--max-batch-tokens", type=int, default=2048, help="prompt tokens admitted per step")
    s.add_argument("--max-adapters-per-batch", type=int, default=32, help="distinct adapters in one batch")
    s.add_argument("--max-resident-adapters", type=int, default=0,
                   help="device adapter slots (0: as many as the pool holds)")
    s.add_argument("--lora-kernel", choices=["auto", "segment", "gather", "native"], default="auto",
                   help="per-token LoRA kernel (auto: the C++ segment loop on CPU when it builds, else Python's; "
                        "gather for decode on CUDA)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    s.add_argument("--enable-adapter-loading", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    s.add_argument("--adapter-root", action="append",
                   help="run-time adapter paths must resolve inside this directory (repeatable)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    s.add_argument("--log-level", default="warning", help="uvicorn's log level")
    s.add_argument("--engine-in-process", action="store_true",
                   help="run the engine on a thread of the server's process (default: a process of its own)")
    s.set_defaults(fn=cmd_serve)

    v = sub.add_parser("env", help="versions, devices and the CPU/GPU capabilities memtune's paths depend on "
                                   "(paste it into a bug report)")
    v.add_argument("--json", action="store_true", help="one JSON object instead of the text report")
    v.set_defaults(fn=cmd_env)
    return p


class _Stderr(logging.StreamHandler):
    """A handler writing to the current sys.stderr (not the one at start-up, which may be replaced)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_logs() -> None:
    """memtune's own log lines (e.g. what classifier_init did) on stderr, as `memtune: ...`."""
    log = logging.getLogger("memtune")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("memtune: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _show_logs()
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "fn", None):
        parser.print_help()
        return 2
    try:
        return ns.fn(ns)
    except MemtuneError as e:
        print(f"memtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
