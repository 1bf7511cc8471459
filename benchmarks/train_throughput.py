"""Training throughput and MFU: llmjax vs Hugging Face PyTorch on this machine's CPU, plus AOT memory.

    .venv/bin/python benchmarks/train_throughput.py            # full run (~10 min on 2 shared cores)
    .venv/bin/python benchmarks/train_throughput.py --steps 2 --warmup 1 --skip-aot   # quick look

What it does, in one process (plus one subprocess for the AOT part):

1. Measures the machine's fp32 matmul peak: a jitted ``jnp.dot`` and a ``torch.matmul`` of two square
   fp32 matrices, best of several runs spread over the whole benchmark (one per timing round, so a
   quiet moment on a shared machine is caught); the peak is the better of the two libraries.
2. For a T5 v1.1 small model and a LLaMA-style decoder of similar size, builds the llmjax model and the
   Hugging Face PyTorch model (``T5ForConditionalGeneration`` / ``LlamaForCausalLM``) with the same
   config and the same initial weights (exported with ``llmjax.hf.save_pretrained``), and runs the
   same full train step on both: forward, backward, global-norm clipping (1.0) and an AdamW update,
   fp32, dropout off, on the same random batch. llmjax uses ``llmjax.train.step.make_train_step`` and
   ``llmjax.train.optim.make_optimizer``; PyTorch uses ``torch.optim.AdamW`` with its defaults.
   The two sides' steps are interleaved (one llmjax step, one PyTorch step, ...) so that load from
   other processes on a shared machine hits both alike; the median step time gives tokens/s.
   The first-step losses of both sides are printed: equal weights and batch give equal losses, which
   shows the two sides compute the same thing.
3. MFU = (matmul FLOPs per step / median step time) / measured peak, FLOPs from
   ``llmjax.models.flops`` (the formula is printed). Every figure is given twice: per second of wall
   time, and per CPU-second of this process (user + system time of all its threads). On a machine
   shared with other work the wall figures fall with the load; the CPU-time figures (step FLOPs per
   CPU-second against matmul FLOPs per CPU-second) do not, as long as threads do not spin.
4. In a subprocess with 8 fake CPU devices, builds a T5 v1.1 base train state abstractly and compiles
   the train step ahead of time for mesh (fsdp=8) with the layers unrolled, scanned, and scanned with
   each remat policy, and for mesh (data=8, i.e. replicated params); prints per-device parameter +
   optimizer bytes from the shardings, the compiled step's argument and temporary bytes from XLA's
   memory analysis, and the compile time.

llmjax runs twice in step 2, ``scan_layers`` on and off (``remat_policy="none"``), from the same weights;
the three sides (scan, unrolled, PyTorch) take turns step by step and the scan / unrolled ratio is printed.

Not run by pytest. Results of a run: ``benchmarks/results/train_throughput_cpu.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmjax import environment, sharding  # noqa: E402
from llmjax.batch import shift_right  # noqa: E402
from llmjax.config import OptimConfig, load_section  # noqa: E402
from llmjax.models import FAMILIES, build_model, family_of, step_flops, unstack_layers  # noqa: E402
from llmjax.models.decoder import DecoderConfig  # noqa: E402
from llmjax.train.lm_loss import lm_loss_fn  # noqa: E402
from llmjax.train.optim import make_optimizer  # noqa: E402
from llmjax.train.state import abstract_train_state, count_params, init_train_state, train_everything  # noqa: E402
from llmjax.train.step import compile_step, make_train_step  # noqa: E402

# Both sides: fp32, AdamW with clipping, constant learning rate (a schedule costs nothing measurable).
OPTIM = OptimConfig(name="adamw", learning_rate=1e-4, schedule="constant", weight_decay=0.01, clip_grad_norm=1.0)
# LLaMA-style decoder of T5-small size: width 512, 8 layers, 8 heads of 64, SwiGLU width 1536
# (8/3 * 512 rounded up to a multiple of 256, LLaMA's rule), LLaMA's 32000-token vocabulary.
DECODER_SMALL = DecoderConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                              num_attention_heads=8, max_position_embeddings=2048)


# ----------------------------------------------------------------------------------------------------
# Machine


def machine_lines() -> list[str]:
    cpu = environment.cpu_model()
    simd = "/".join(environment.vector_extensions()) or "unknown"
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    import flax
    import optax
    import torch
    import transformers
    return [
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        f"machine: {cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.1f} GiB memory, {platform.platform()}; "
        f"vector extensions {simd}",
        f"load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"versions: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"optax {optax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"jax devices: {jax.devices()}; torch threads: {torch.get_num_threads()}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
    ]


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class Timing:
    """Wall-clock and process CPU seconds of repeated runs of one thing."""

    wall: list = dataclasses.field(default_factory=list)
    cpu: list = dataclasses.field(default_factory=list)

    def measure(self, run) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        run()
        self.cpu.append(cpu_seconds() - cpu)
        self.wall.append(time.perf_counter() - wall)


class MatmulPeak:
    """fp32 ``[n, n] @ [n, n]`` FLOP rate: a jitted ``jnp.dot`` (and ``torch.matmul`` for reference)."""

    def __init__(self, size: int):
        import torch

        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        self.flops = 2.0 * size**3
        dot = jax.jit(jnp.dot)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        self.run_jax = lambda: dot(ja, jb).block_until_ready()
        self.run_torch = lambda: torch.matmul(ta, tb)
        self.run_jax(), self.run_torch()
        self.jax, self.torch = Timing(), Timing()

    def measure(self, repeats: int = 1) -> None:
        for _ in range(repeats):
            self.jax.measure(self.run_jax)
            self.torch.measure(self.run_torch)

    def best(self, which: str, clock: str) -> float:
        """Best FLOP/s (``clock="wall"``) or FLOPs per CPU-second (``clock="cpu"``) of ``which`` library."""
        return self.flops / min(getattr(getattr(self, which), clock))

    def machine(self, clock: str) -> float:
        """The machine's peak: the better of the two libraries (MFU is measured against this)."""
        return max(self.best("jax", clock), self.best("torch", clock))


# ----------------------------------------------------------------------------------------------------
# The two sides of one comparison


@dataclasses.dataclass
class Workload:
    """One model and batch shape; ``batch`` holds t5x-named numpy features ``[batch, length]`` int32."""

    name: str
    config: object
    batch: dict
    encoder_length: int | None
    decoder_length: int

    @property
    def family(self) -> str:
        return family_of(self.config)

    @property
    def batch_size(self) -> int:
        return self.batch["decoder_input_tokens"].shape[0]


def t5_workload(batch_size: int, encoder_length: int, decoder_length: int) -> Workload:
    config = load_section(REPO / "configs/model/t5_small.yaml", "model")
    config = dataclasses.replace(config, dropout_rate=0.0)
    rng = np.random.default_rng(0)
    # ids >= 2 (no pad, no eos) fill every row: the span-corruption shape of a packed batch
    targets = rng.integers(2, config.vocab_size, (batch_size, decoder_length), dtype=np.int32)
    batch = {
        "encoder_input_tokens": rng.integers(2, config.vocab_size, (batch_size, encoder_length), dtype=np.int32),
        "decoder_input_tokens": shift_right(targets, config.decoder_start_token_id),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones_like(targets),
    }
    return Workload("T5 v1.1 small", config, batch, encoder_length, decoder_length)


def decoder_workload(batch_size: int, length: int) -> Workload:
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, DECODER_SMALL.vocab_size, (batch_size, length), dtype=np.int32)
    # next-token targets; the last position has none (weight 0), exactly what HF's labels=input_ids does
    weights = np.ones_like(tokens)
    weights[:, -1] = 0
    batch = {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": np.roll(tokens, -1, axis=1),
        "decoder_loss_weights": weights,
    }
    return Workload("LLaMA-style decoder (T5-small size)", DECODER_SMALL, batch, None, length)


def llmjax_side(work: Workload, scan_layers: bool, params=None):
    """``(step_fn, model, initial params on host)``: ``step_fn()`` runs one jitted train step and blocks.

    ``params``: start from these (host arrays in the layout ``scan_layers`` asks); None: random init.
    """
    model = build_model(dataclasses.replace(work.config, scan_layers=scan_layers, remat_policy="none"))
    tx, _ = make_optimizer(OPTIM, total_steps=1000)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    # Outside `activate`: the init places every leaf itself (and checks given params against abstract boxes).
    state, state_shardings = init_train_state(model, tx, train_everything, seed=0, mesh=mesh, params=params)
    with sharding.activate(mesh):
        params = jax.device_get(state.params)
        step = compile_step(make_train_step(lm_loss_fn(model), tx), updates_state=True,
                            state_shardings=state_shardings, batch_sharding=sharding.batch_sharding(mesh))
        batch = sharding.shard_batch(work.batch, mesh)
    return step_runner(step, state, batch, mesh), model, params


def step_runner(step, state, batch, mesh):
    """``run() -> loss``: one call of the compiled train ``step`` on ``batch``, carrying the state, blocking."""
    holder = {"state": state}

    def run() -> float:
        with sharding.activate(mesh):
            holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    return run


def torch_model_and_inputs(work: Workload, model, params):
    """The Hugging Face PyTorch model with llmjax's ``params`` (through ``llmjax.hf.save_pretrained``) and
    the keyword inputs of ``work``'s batch for its forward pass with labels."""
    import torch
    import transformers

    from llmjax import hf

    transformers.logging.set_verbosity_error()  # the untied-head notice and load progress bars
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(model, params, tmp)
        auto = transformers.AutoModelForSeq2SeqLM if work.family == "t5" else transformers.AutoModelForCausalLM
        torch_model = auto.from_pretrained(tmp, dtype=torch.float32)
    as_long = lambda name: torch.from_numpy(work.batch[name].astype(np.int64))  # noqa: E731
    if work.family == "t5":
        inputs = {"input_ids": as_long("encoder_input_tokens"),
                  "attention_mask": torch.ones_like(as_long("encoder_input_tokens")),
                  "decoder_input_ids": as_long("decoder_input_tokens"),
                  "labels": as_long("decoder_target_tokens")}
    else:
        inputs = {"input_ids": as_long("decoder_input_tokens"), "labels": as_long("decoder_input_tokens")}
    return torch_model, inputs


def torch_train_step(torch_model, inputs):
    """``(step_fn, optimizer)``: ``step_fn()`` runs one PyTorch train step of the parameters that require
    gradients (AdamW with the benchmark's settings, clipping) and returns the loss."""
    import torch

    torch_model.train()
    trainable = [p for p in torch_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=OPTIM.learning_rate, weight_decay=OPTIM.weight_decay)

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch_model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, OPTIM.clip_grad_norm)
        optimizer.step()
        return float(loss.detach())

    return run, optimizer


def torch_side(work: Workload, model, params):
    """``step_fn()`` running one PyTorch train step (same weights, batch, optimizer settings)."""
    torch_model, inputs = torch_model_and_inputs(work, model, params)
    run, _ = torch_train_step(torch_model, inputs)
    return run, torch_model


def time_interleaved(sides: dict, peak: MatmulPeak, warmup: int, steps: int) -> dict:
    """Run the sides' steps alternately, one matmul-peak measurement per round; per side, a ``Timing``."""
    timings = {name: Timing() for name in sides}
    for i in range(warmup + steps):
        for name, run in sides.items():
            if i >= warmup:
                timings[name].measure(run)
            else:
                run()
        peak.measure()
    return timings


def op_time_breakdown(run) -> str:
    """Trace one call of ``run`` with the JAX profiler; XLA op time by kind, as percentages.

    XLA CPU names its thunks by kind: ``ynn_fusion``/``dot`` are matmuls (YNNPACK / Eigen), names
    with ``copy`` or ``transpose`` are layout changes, the rest are elementwise and reduction fusions.
    """
    kinds = {"matmul": 0.0, "layout copies/transposes": 0.0, "elementwise/reductions": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        run()
        jax.profiler.stop_trace()
        trace_file = next(Path(tmp).rglob("*.trace.json.gz"))
        events = json.loads(gzip.decompress(trace_file.read_bytes()))
    for event in events["traceEvents"] if isinstance(events, dict) else events:
        name = event.get("name", "")
        if event.get("ph") != "X" or not re.fullmatch(r"[a-z_]+(\.\d+)?", name) or name.startswith("end"):
            continue  # runtime bookkeeping (executor, thread pool), not an XLA op
        if name.startswith(("ynn_fusion", "dot")):
            kinds["matmul"] += event["dur"]
        elif "copy" in name or "transpose" in name:
            kinds["layout copies/transposes"] += event["dur"]
        else:
            kinds["elementwise/reductions"] += event["dur"]
    total = sum(kinds.values()) or 1.0
    return ", ".join(f"{kind} {100 * t / total:.0f}%" for kind, t in kinds.items())


def compare(work: Workload, peak: MatmulPeak, warmup: int, steps: int):
    """Time the sides; returns ``report(peak) -> lines``, called once the peak has been measured enough.

    llmjax runs twice, with the layers scanned (``scan_layers=True``) and unrolled, from the same weights:
    the three sides' steps are interleaved, so load from other processes hits them alike.
    """
    scan_run, model, params = llmjax_side(work, scan_layers=True)
    unrolled_run, _, _ = llmjax_side(work, scan_layers=False, params=unstack_layers(params, model.config))
    torch_run, _ = torch_side(work, model, params)
    # The first step of each side (llmjax: compile + step) is untimed; its loss, before any update,
    # must agree between the sides.
    first_loss, compile_s = {}, {}
    for name, run in (("llmjax scan", scan_run), ("llmjax unrolled", unrolled_run)):
        start = time.perf_counter()
        first_loss[name] = run()
        compile_s[name] = time.perf_counter() - start
    first_loss["pytorch"] = torch_run()
    sides = {"llmjax scan": scan_run, "llmjax unrolled": unrolled_run, "pytorch": torch_run}
    timings = time_interleaved(sides, peak, warmup, steps)
    breakdown = op_time_breakdown(scan_run)

    flops = step_flops(work.config, work.batch_size, work.decoder_length, work.encoder_length)
    shape = (f"batch {work.batch_size}, encoder {work.encoder_length} / decoder {work.decoder_length} tokens"
             if work.family == "t5" else f"batch {work.batch_size}, {work.decoder_length} tokens")
    lines = [
        f"== {work.name}: {count_params(params) / 1e6:.1f}M params, {shape}, fp32, "
        f"AdamW + clip 1.0, dropout 0 ==",
        f"config: {work.config} (remat_policy 'none'; llmjax runs with scan_layers True and False)",
        f"FLOPs/step {flops.total / 1e9:.1f} G (dense {flops.dense / 1e9:.1f} G + attention "
        f"{flops.attention / 1e9:.1f} G), tokens/step {flops.tokens}",
        "llmjax first call (compile + step): " + ", ".join(f"{name} {t:.1f} s" for name, t in compile_s.items())
        + f"; then per side {warmup} warmup + {steps} timed steps, interleaved",
        "first-step loss (same weights, same batch): " + "  ".join(f"{n} {v:.6f}" for n, v in first_loss.items()),
    ]
    lines.append(f"llmjax scan step, XLA op time by kind (one profiled step): {breakdown}")
    return lambda peak: lines + _rate_lines(flops, timings, peak)


def _rate_lines(flops, timings: dict, peak: MatmulPeak) -> list[str]:
    wall_peak, cpu_peak = peak.machine("wall"), peak.machine("cpu")
    lines, rates = [], {}
    for name, timing in timings.items():
        wall, cpu = statistics.median(timing.wall), statistics.median(timing.cpu)
        rates[name] = (flops.tokens / wall, flops.tokens / cpu)
        lines.append(
            f"  {name:15s} wall: step median {wall:7.3f} s (min {min(timing.wall):.3f}, max {max(timing.wall):.3f}) "
            f"{rates[name][0]:7.0f} tokens/s {flops.total / wall / 1e9:6.1f} GFLOP/s "
            f"MFU {100 * flops.total / wall / wall_peak:5.1f}%"
        )
        lines.append(
            f"  {name:15s} cpu:  step median {cpu:7.3f} CPU-s                      "
            f"{rates[name][1]:7.0f} tokens/CPU-s {flops.total / cpu / 1e9:6.1f} GFLOP/CPU-s MFU "
            f"{100 * flops.total / cpu / cpu_peak:5.1f}%"
        )
    for ours, theirs in (("llmjax scan", "llmjax unrolled"), ("llmjax scan", "pytorch"),
                         ("llmjax unrolled", "pytorch")):
        lines.append(f"  ratio {ours} / {theirs} tokens/s: wall {rates[ours][0] / rates[theirs][0]:.2f}x, "
                     f"CPU time {rates[ours][1] / rates[theirs][1]:.2f}x")
    return lines


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time memory on 8 fake devices (runs in a subprocess: the device count is fixed at JAX start)


def aot_lines() -> list[str]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__, "--aot-worker"], env=env, capture_output=True, text=True)
    if result.returncode:
        return [f"AOT subprocess failed (exit {result.returncode}):", result.stderr[-3000:]]
    return result.stdout.splitlines()


# (label, mesh, scan_layers, remat_policy) of the AOT compiles: layouts and remat policies under fsdp=8,
# then the default layout with replicated parameters.
AOT_VARIANTS = (
    ("fsdp=8 unrolled", dict(data=1, fsdp=8), False, "none"),
    ("fsdp=8 scan", dict(data=1, fsdp=8), True, "none"),
    ("fsdp=8 scan+save_dots_no_batch", dict(data=1, fsdp=8), True, "save_dots_no_batch"),
    ("fsdp=8 scan+save_dots", dict(data=1, fsdp=8), True, "save_dots"),
    ("fsdp=8 scan+full", dict(data=1, fsdp=8), True, "full"),
    ("replicated (data=8) scan", dict(data=8), True, "none"),
)


def aot_worker(batch_size: int, encoder_length: int, decoder_length: int) -> None:
    config = load_section(REPO / "configs/model/t5_base.yaml", "model")
    tx, _ = make_optimizer(OPTIM, total_steps=1000)
    print(f"== AOT: T5 v1.1 base ({config.num_layers}+{config.decoder_layers} layers, d_model {config.d_model}), "
          f"AdamW, {len(jax.devices())} fake CPU devices, batch {batch_size}, {encoder_length}/{decoder_length} "
          "tokens ==")
    ints = lambda length: jax.ShapeDtypeStruct((batch_size, length), jnp.int32)  # noqa: E731
    for label, mesh_shape, scan_layers, remat_policy in AOT_VARIANTS:
        model = build_model(dataclasses.replace(config, scan_layers=scan_layers, remat_policy=remat_policy))
        step = make_train_step(lm_loss_fn(model), tx)
        mesh = sharding.make_mesh(**mesh_shape)
        with sharding.activate(mesh):
            abstract = abstract_train_state(model, tx, train_everything, mesh)
            shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
            params_bytes = sharding.state_bytes_per_device(abstract.params, shardings.params)
            opt_bytes = sharding.state_bytes_per_device(abstract.opt_state, shardings.opt_state)
            batch_sh = sharding.batch_sharding(mesh)
            batch = {name: jax.ShapeDtypeStruct(ints(length).shape, jnp.int32, sharding=batch_sh)
                     for name, length in (("encoder_input_tokens", encoder_length),
                                          ("decoder_input_tokens", decoder_length),
                                          ("decoder_target_tokens", decoder_length),
                                          ("decoder_loss_weights", decoder_length))}
            start = time.perf_counter()
            compiled = compile_step(step, updates_state=True, state_shardings=shardings,
                                    batch_sharding=batch_sh).lower(abstract, batch).compile()
            seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        print(f"  {label:30s} params {params_bytes / 2**20:8.1f} MiB + optimizer {opt_bytes / 2**20:8.1f} MiB "
              f"= {(params_bytes + opt_bytes) / 2**20:8.1f} MiB per device; compiled step: arguments "
              f"{memory.argument_size_in_bytes / 2**20:.1f} MiB, temporaries {memory.temp_size_in_bytes / 2**20:.1f} "
              f"MiB per device (compiled in {seconds:.0f} s)")
    print(f"  total params {count_params(abstract.params) / 1e6:.1f}M")


# ----------------------------------------------------------------------------------------------------


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The step counts and workload shapes every train-step benchmark takes."""
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side after the first call")
    parser.add_argument("--t5-batch", type=int, default=4)
    parser.add_argument("--encoder-length", type=int, default=512)
    parser.add_argument("--decoder-length", type=int, default=114)
    parser.add_argument("--decoder-only-batch", type=int, default=4)
    parser.add_argument("--decoder-only-length", type=int, default=256)
    parser.add_argument("--only", choices=("t5", "decoder"), default=None, help="run one model family only")


def workloads_of(args) -> list[Workload]:
    """The workloads ``add_workload_args``' arguments ask for."""
    workloads = []
    if args.only in (None, "t5"):
        workloads.append(t5_workload(args.t5_batch, args.encoder_length, args.decoder_length))
    if args.only in (None, "decoder"):
        workloads.append(decoder_workload(args.decoder_only_batch, args.decoder_only_length))
    return workloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Defaults sized for ~10 minutes on 2 shared cores: T5 keeps the span-corruption lengths (512/114)
    # at batch 4; the decoder-only model reads 4 x 256 tokens.
    add_workload_args(parser)
    parser.add_argument("--peak-size", type=int, default=4096)
    parser.add_argument("--skip-aot", action="store_true")
    parser.add_argument("--aot-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.aot_worker:
        aot_worker(8, 512, 114)
        return

    for line in machine_lines():
        print(line, flush=True)
    peak = MatmulPeak(args.peak_size)
    peak.measure(repeats=5)
    for family, record in FAMILIES.items():
        indented = record.flops_formula.replace("\n", "\n  ")
        print(f"FLOPs per train step, {family} (matmuls only, forward + backward):\n  {indented}")
    reports = [compare(work, peak, args.warmup, args.steps) for work in workloads_of(args)]
    for report in reports:
        for line in report(peak):
            print(line, flush=True)
    print(f"fp32 matmul peak ({args.peak_size}^3, best of {len(peak.jax.wall)} spread over the run): "
          f"jax jnp.dot {peak.best('jax', 'wall') / 1e9:.1f} GFLOP/s and {peak.best('jax', 'cpu') / 1e9:.1f} "
          f"GFLOP/CPU-s; torch.matmul {peak.best('torch', 'wall') / 1e9:.1f} GFLOP/s and "
          f"{peak.best('torch', 'cpu') / 1e9:.1f} GFLOP/CPU-s. MFU above is against the better library's figure.")
    print("(wall: tokens per second of wall-clock time; cpu: per CPU-second of this process, which other "
          "processes sharing the cores do not inflate)")
    if not args.skip_aot:
        for line in aot_lines():
            print(line, flush=True)
    print(f"load average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
