"""Training over 2 processes on CPU (gloo), started by the tests with torchrun, accelerate or two
`--nnodes 2` launchers: every recipe gives the one-process result of the same global batch.

The one-process references run in this process with train.batch_size=4; the distributed runs use 2
ranks x batch_size 2. Llama's tiny preset has no dropout and MeZO evaluates in eval mode, so the runs
are comparable to fp32 rounding (dropout masks, where a model has them, are drawn per rank).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from memtune.distributed.parallel import resolve_strategy
from memtune.distributed.config import DistributedConfig
from memtune.distributed.world import World, launcher_world
from memtune.errors import ConfigError, MemtuneError
from memtune.recipe import load_recipe
from memtune.train import train

DRIVER = str(ROOT / "tests" / "helpers" / "dist_train.py")
ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")  # 40 examples
ALPACA_EVAL = str(ROOT / "examples" / "data" / "alpaca_eval.jsonl")
BASE = ["model=tiny-llama", f"data.train={ALPACA}", f"data.eval={ALPACA_EVAL}", "train.max_steps=3",
        "optimizer.lr=1e-3", "train.progress=false", "train.measure_memory_steps=1"]
LORA = ["adapter.kind=lora", "adapter.r=4"]
AXES = {
    "lora": LORA,
    "full": [],
    "qlora": LORA + ["quantize.kind=nf4"],
    "int4": LORA + ["quantize.kind=int4", "quantize.group_size=32"],
    "prefix": ["adapter.kind=prefix", "adapter.num_virtual_tokens=4"],
    "prompt": ["adapter.kind=prompt", "adapter.num_virtual_tokens=4"],
    "vera": ["adapter.kind=vera"],
    "dylora": ["adapter.kind=dylora", "adapter.r=4"],
    "qst": ["adapter.kind=qst"],
    "tokentune": LORA + ["tokentune.select=8"],
    "accumulation": LORA + ["train.grad_accum=2"],
    "checkpointing": LORA + ["train.gradient_checkpointing=true"],
    "mezo": LORA + ["optimizer.kind=mezo", "optimizer.lr=1e-2"],
    "mezo-full": ["optimizer.kind=mezo"],
}
STRATEGIES = ("ddp", "fsdp")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout every rank is killed (nothing hangs)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or ENV,
                         start_new_session=True, cwd=ROOT)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{cmd[:3]} timed out after {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def run_driver(tmp: Path, runs: list[list[str]], name: str, timeout: float = 300, **jobs):
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"runs": runs, **jobs}))
    return launch(torchrun(DRIVER, str(spec)), timeout=timeout)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((out / "adapter").glob("*.safetensors")) + sorted((out / "model").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_run(one: Path, other: Path, weight_atol: float = 5e-5) -> None:
    assert not (other / "error.txt").exists(), (other / "error.txt").read_text()[:2000]
    torch.testing.assert_close(torch.tensor(losses(other)), torch.tensor(losses(one)), rtol=1e-5, atol=1e-5)
    w1, w2 = weights(one), weights(other)
    assert w1 and set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k].float(), w1[k].float(), rtol=1e-4, atol=weight_atol, msg=k)
    e1, e2 = (json.loads((d / "summary.json").read_text())["eval"] for d in (one, other))
    assert e2["loss"] == pytest.approx(e1["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every axis: the one-process reference here, then all distributed runs under one torchrun."""
    tmp = tmp_path_factory.mktemp("dist")
    for name, extra in AXES.items():
        train(load_recipe(None, BASE + extra + ["train.batch_size=4", f"output_dir={tmp / name}-one"]))
    runs = [BASE + extra + ["train.batch_size=2", f"distributed.strategy={s}", f"output_dir={tmp / name}-{s}"]
            for name, extra in AXES.items() for s in STRATEGIES]
    done = run_driver(tmp, runs, "matrix")
    assert done.returncode == 0, done.stdout[-4000:]
    return tmp


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("axis", list(AXES))
def test_equals_one_process(matrix, axis, strategy):
    assert_same_run(matrix / f"{axis}-one", matrix / f"{axis}-{strategy}")


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("axis", ["lora", "full", "qlora"])
def test_fsdp_holds_half_of_ddp_per_rank(matrix, axis):
    ddp, fsdp = (summary(matrix / f"{axis}-{s}")["distributed"]["memory_bytes_per_rank"] for s in STRATEGIES)
    assert [r["rank"] for r in ddp] == [0, 1] == [r["rank"] for r in fsdp]
    for d, f in zip(ddp, fsdp):
        for k in ("parameters_trainable", "gradients", "optimizer"):
            assert f[k] == pytest.approx(d[k] / 2, rel=0.01), k
        assert f["parameters"] < 0.6 * d["parameters"]  # frozen (4-bit) storage sharded too
    one = summary(matrix / f"{axis}-one")["memory_bytes"]
    assert ddp[0]["parameters"] == one["parameters"]


def test_mezo_sends_eight_bytes_a_step(matrix):
    comm = summary(matrix / "mezo-ddp")["distributed"]["communication_per_step"]
    assert comm["payload_bytes"] == {"all_reduce": 8} and comm["calls"] == {"all_reduce": 1.0}
    d = summary(matrix / "mezo-ddp")["distributed"]
    assert d["strategy"] == "replicated"
    ddp = summary(matrix / "lora-ddp")["distributed"]["communication_per_step"]
    lora_grad_bytes = summary(matrix / "lora-one")["memory_bytes"]["gradients"]
    assert ddp["payload_bytes"]["all_reduce"] >= lora_grad_bytes  # gradients, once a step
    fsdp = summary(matrix / "mezo-fsdp")["distributed"]["communication_per_step"]["payload_bytes"]
    assert fsdp["all_reduce"] == 8 and "reduce_scatter" not in fsdp and fsdp["all_gather"] > 0


def test_rank_zero_writes_one_summary(matrix):
    out = matrix / "lora-ddp"
    s = summary(out)
    assert s["distributed"]["world_size"] == 2 and s["distributed"]["micro_batch_examples"] == 4
    assert len(losses(out)) == 3
    assert (out / "adapter" / "adapter_config.json").is_file()


# -- checkpoints --------------------------------------------------------------------------------


def test_killed_fsdp_run_resumes_and_loads_in_one_process(tmp_path):
    steps = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3"]
    rec = BASE + LORA + steps
    train(load_recipe(None, rec + ["train.batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    killed = tmp_path / "fsdp"
    dist = rec + ["train.batch_size=2", "distributed.strategy=fsdp", f"output_dir={killed}"]
    died = run_driver(tmp_path, [dist], "die", die_at_step=4)
    assert died.returncode != 0 and not (killed / "summary.json").exists()
    ckpt = killed / "checkpoints" / "step-000004"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    copy = tmp_path / "single"
    shutil.copytree(killed, copy)
    with pytest.raises(MemtuneError, match="does not match this recipe"):  # another adapter shape
        train(load_recipe(None, rec + ["adapter.r=8", "train.batch_size=4", f"output_dir={copy}"]), resume=True)
    resumed = run_driver(tmp_path, [dist], "resume", resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_run(tmp_path / "one", killed, weight_atol=2e-5)
    # the same world-size-2 checkpoint resumed by one process with the same global batch
    train(load_recipe(None, rec + ["train.batch_size=4", f"output_dir={copy}"]), resume=True)
    assert_same_run(tmp_path / "one", copy, weight_atol=2e-5)
    # a different global batch is refused with the fix
    with pytest.raises(MemtuneError, match="train.batch_size = 4 / ranks"):
        train(load_recipe(None, rec + ["train.batch_size=2", f"output_dir={copy}"]), resume=True)


# -- launchers ---------------------------------------------------------------------------------


def test_two_nodes_on_loopback_train_like_one_process(matrix, tmp_path):
    port = free_port()
    out = tmp_path / "nodes"
    args = ["-m", "memtune", "train", *BASE, *LORA, "train.batch_size=2", f"output_dir={out}"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(i), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=ENV, start_new_session=True, cwd=ROOT) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[-1][-3000:]
    assert '"steps": 3' in outs[0] and '"steps"' not in outs[1]  # node 0's rank 0 prints the summary
    assert_same_run(matrix / "lora-one", out)


@pytest.mark.parametrize("flags, strategy", [(["--multi_gpu"], "ddp"), (["--use_fsdp", "--fsdp_version", "2"], "fsdp")])
def test_accelerate_launch_trains_like_one_process(matrix, tmp_path, flags, strategy):
    out = tmp_path / "accel"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "memtune", "train", *BASE, *LORA, "train.batch_size=2", f"output_dir={out}"]
    done = launch(cmd)
    assert done.returncode == 0, done.stdout[-3000:]
    assert summary(out)["distributed"]["strategy"] == strategy
    assert_same_run(matrix / "lora-one", out)


def test_lone_copies_from_another_launcher_are_stopped(tmp_path):
    env = {**ENV, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    env.pop("WORLD_SIZE", None)
    done = launch([sys.executable, "-m", "memtune", "train", *BASE, *LORA, f"output_dir={tmp_path / 'x'}"], env=env)
    assert done.returncode == 2
    assert "one of 2 started by mpirun" in done.stdout and "torchrun" in done.stdout
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.parametrize("env, message", [
    ({"PMI_SIZE": "4"}, "one of 4"),
    ({"LOCAL_WORLD_SIZE": "2"}, "do not know of each other"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "outside"),
    ({"WORLD_SIZE": "two"}, "expected an integer"),
])
def test_launcher_environment_errors(env, message):
    with pytest.raises(MemtuneError, match=message):
        launcher_world(env)


def test_launcher_environment():
    w = launcher_world({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.is_main) == (3, 4, 1, 2, False)
    assert launcher_world({}).size == 1 and launcher_world({"WORLD_SIZE": "1"}).size == 1
    assert [World(rank=r, size=3).share(list(range(8))) for r in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]


def test_strategy_resolution():
    two = World(rank=0, size=2)
    assert resolve_strategy(DistributedConfig(), World(), env={}) == "none"
    assert resolve_strategy(DistributedConfig(), two, env={}) == "ddp"
    assert resolve_strategy(DistributedConfig(), two, env={"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    with pytest.raises(ConfigError, match="started 2 processes"):
        resolve_strategy(DistributedConfig(strategy="none"), two, env={})
    with pytest.raises(ConfigError, match="--use_fsdp"):
        resolve_strategy(DistributedConfig(strategy="ddp"), two, env={"ACCELERATE_USE_FSDP": "1"})


def test_recipe_section_is_checked():
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        load_recipe(None, BASE + ["distributed.timeout_s=0"])
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_recipe(None, BASE + ["distributed.strategy=zero3"])
    with pytest.raises(ConfigError, match="adapter.kind=adalora with distributed.strategy=fsdp"):
        load_recipe(None, BASE + ["adapter.kind=adalora", "distributed.strategy=fsdp"])
    r = load_recipe(None, BASE + ["distributed.strategy=fsdp", "distributed.mixed_precision.param=bf16",
                                  "distributed.wrap=[LlamaDecoderLayer]"])
    assert r.distributed.mixed_precision.param == "bf16" and r.distributed.wrap == ["LlamaDecoderLayer"]
