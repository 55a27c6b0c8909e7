"""Throughput, compile time and peak memory: spanet-jax vs PyTorch, same machine, same run.

  python benchmarks/benchmark.py --models spanet_s spanet_m spanet_b
  python benchmarks/benchmark.py --official-file /path/to/SPANet-official/image_classification/spanet.py
  python benchmarks/benchmark.py --models spanetv2_s18_pure spanetv2_s18_hybrid \
      --official-file /path/to/SPANetV2-official/image_classification/models/spanetv2.py

For each model it times, alternating between the frameworks after warm-up, one batch
of: the forward pass (JAX: `create_model(name)` under jax.jit; PyTorch: eval mode,
no_grad) and an AdamW training step (cross-entropy, backward, update), and reports
the median of the repeats and the JAX/PyTorch ratios, with the lowest and highest
ratio of a single alternation round (a wide spread marks a noisy run). The training
step's memory is measured in a fresh process per framework: its footprint (peak
anonymous resident memory while steps run after warm-up, minus that before the model
was built) and its growth above the level between steps.

The PyTorch side is our reference (spanet_jax.reference.spanet_torch, spanetv2_torch)
unless --official-file points at the official repository's spanet.py (or spanetv2.py
for SPANetV2 models), which is then imported with small stand-ins for the timm helpers
it uses (timm itself does not install beside torch 2.13).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import types

OFFICIAL_BUILDERS = {"spanet_s": "spanet_small", "spanet_m": "spanet_medium",
                     "spanet_mx": "spanet_mediumX", "spanet_b": "spanet_base",
                     "spanet_bx": "spanet_baseX"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=["spanet_s", "spanet_m", "spanet_b"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--modes", nargs="+", default=["forward", "train"],
                      choices=["forward", "train"])
  parser.add_argument("--official-file", default=None,
                      help="the official spanet.py, to benchmark against it instead of our "
                           "PyTorch reference")
  parser.add_argument("--layers", nargs=4, type=int, default=None, metavar="N",
                      help="blocks per stage instead of the model's own (our PyTorch reference "
                           "only): a quick run of the harness, not the model's figures")
  parser.add_argument("--jax-options", nargs="+", default=[], metavar="KEY=VALUE",
                      help="create_model options for the JAX side, e.g. spectral_impl=dft")
  parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
  parser.add_argument("--malloc", choices=["default", "keep"], default="default",
                      help="default: glibc's own settings, as in any script; keep: "
                           "spanet_jax.train.host_memory.keep_freed_memory(), as train.py does on "
                           "CPU (for both frameworks: they share the process)")
  parser.add_argument("--json", default=None, help="also write the results here")
  parser.add_argument("--memory-probe", nargs=2, metavar=("FRAMEWORK", "MODEL"),
                      help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# PyTorch side.


def _timm_stand_ins():
  """The four timm helpers the official file imports, written here."""
  import torch  # pylint: disable=g-import-not-at-top

  from spanet_jax.reference.spanet_torch import DropPath  # pylint: disable=g-import-not-at-top

  layers = types.ModuleType("timm.models.layers")
  layers.trunc_normal_ = lambda tensor, std=1.0: torch.nn.init.trunc_normal_(tensor, std=std)
  layers.DropPath = DropPath
  helpers = types.ModuleType("timm.models.layers.helpers")
  helpers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
  registry = types.ModuleType("timm.models.registry")
  registry.register_model = lambda fn: fn
  data = types.ModuleType("timm.data")
  data.IMAGENET_DEFAULT_MEAN, data.IMAGENET_DEFAULT_STD = (0.485, 0.456, 0.406), (
      0.229, 0.224, 0.225)
  models = types.ModuleType("timm.models")
  timm = types.ModuleType("timm")
  return {"timm": timm, "timm.models": models, "timm.models.layers": layers,
          "timm.models.layers.helpers": helpers, "timm.models.registry": registry,
          "timm.data": data}


def import_official(official_file: str) -> types.ModuleType:
  """The official spanet.py or spanetv2.py as a module, with the timm stand-ins."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  sys.modules.update(_timm_stand_ins())
  spec = importlib.util.spec_from_file_location("official_spanet", official_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_torch_model(name: str, official_file: str | None):
  from spanet_jax.models import registry  # pylint: disable=g-import-not-at-top

  info = registry.model_info(name)
  if official_file is None:
    from spanet_jax.reference import spanet_torch, spanetv2_torch  # pylint: disable=g-import-not-at-top
    builder = (spanetv2_torch.SPANetV2 if info.family == "spanetv2"
               else spanet_torch.SPANet)
    return builder(**info.architecture), "reference"
  module = import_official(official_file)
  # SPANetV2's official builders carry our model names.
  builder = getattr(module, OFFICIAL_BUILDERS.get(name, name), None)
  if builder is None:
    raise SystemExit(f"{official_file} has no builder for {name}")
  with contextlib.redirect_stdout(io.StringIO()):  # SPANet's prints its lambdas per block
    return builder(), "official"


def torch_runners(model, batch: np.ndarray, labels: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top

  x = torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels)
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=1e-3, weight_decay=0.05)

  def forward():
    model.eval()
    with torch.no_grad():
      model(x)

  def train_step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()

  return {"forward": forward, "train": train_step}


# ---------------------------------------------------------------------------------------
# JAX side.


def jax_options(pairs) -> dict:
  """--jax-options KEY=VALUE pairs as create_model keyword arguments."""
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"--jax-options {pair}: use KEY=VALUE")
    try:
      options[key] = ast.literal_eval(value)  # numbers, True / False, tuples
    except (ValueError, SyntaxError):
      options[key] = value  # a plain string such as dft
  return options


def jax_runners(name: str, torch_model, batch: np.ndarray, labels: np.ndarray,
                options: dict | None = None, modes=("forward", "train")):
  """Runners and compile times for create_model(name), with the torch model's weights,
  for the given modes only (a compiled executable holds memory of its own)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import spanet_jax  # pylint: disable=g-import-not-at-top
  from spanet_jax import convert  # pylint: disable=g-import-not-at-top

  state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  model_name, overrides, params = convert.torch_to_flax(state_dict, name)
  model = spanet_jax.create_model(model_name, **overrides, **(options or {}))
  params = jax.device_put(params)
  x, y = jax.device_put(batch), jax.device_put(labels)
  optimizer = optax.adamw(1e-3, weight_decay=0.05)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  compile_seconds, runners = {}, {}
  state = {"params": params}
  if "forward" in modes:
    start = time.perf_counter()
    forward_fn = jax.jit(model.apply).lower({"params": params}, x).compile()
    compile_seconds["forward"] = time.perf_counter() - start
    runners["forward"] = lambda: forward_fn({"params": state["params"]}, x).block_until_ready()
  if "train" in modes:
    state["opt"] = optimizer.init(params)
    start = time.perf_counter()
    step_fn = jax.jit(step, donate_argnums=(0, 1)).lower(
        state["params"], state["opt"], x, y).compile()
    compile_seconds["train"] = time.perf_counter() - start

    def train_step():  # donates the parameters: the forward runner reads the current ones
      state["params"], state["opt"], loss = step_fn(state["params"], state["opt"], x, y)
      loss.block_until_ready()

    runners["train"] = train_step
  return runners, compile_seconds


# ---------------------------------------------------------------------------------------
# Measurement.


def _anonymous_kib() -> int:
  """RssAnon of /proc/self/status, in KiB: the memory the process allocated, without
  the libraries' file-backed pages, which the kernel drops and reloads under memory
  pressure (VmRSS and its peak VmHWM count them, so a footprint read from them could
  come out below zero)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1])
  raise RuntimeError("no RssAnon in /proc/self/status")


class AnonymousPeak:
  """The highest RssAnon (KiB) seen while the block runs, read every `interval`
  seconds by a thread (the kernel keeps no peak of anonymous memory alone)."""

  def __init__(self, interval: float = 0.001):
    self.interval = interval
    self.peak_kib = 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)

  def _watch(self) -> None:
    while not self._done.is_set():
      self.peak_kib = max(self.peak_kib, _anonymous_kib())
      self._done.wait(self.interval)

  def __enter__(self) -> "AnonymousPeak":
    self.peak_kib = _anonymous_kib()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._done.set()
    self._thread.join()
    self.peak_kib = max(self.peak_kib, _anonymous_kib())


def memory_probe(framework: str, name: str, args) -> None:
  """Child process: the training step's memory, in MiB, two ways.

  footprint: the peak anonymous resident memory while training steps run, after
  warm-up, minus that before the model was built: weights, optimizer state, gradients,
  activations and workspace (for JAX also the compiled code; not the transient memory
  of compiling, which is returned to the system before the steps are measured).
  step_growth: how far it rises above its level between steps during those steps.
  """
  import ctypes  # pylint: disable=g-import-not-at-top

  import jax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  batch, labels = _inputs(args)
  # The JAX side takes its weights from a PyTorch model built before the baseline, so
  # each side is charged for its own copy of the weights only.
  torch_model = build_torch_model(name, args.official_file)[0] if framework == "jax" else None
  baseline = _anonymous_kib()
  if framework == "jax":
    runners, _ = jax_runners(name, torch_model, batch, labels, jax_options(args.jax_options),
                             modes=("train",))
  else:
    runners = torch_runners(build_torch_model(name, args.official_file)[0], batch, labels)
  for _ in range(args.warmup):
    runners["train"]()
  ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building and compiling freed
  between_steps = _anonymous_kib()
  with AnonymousPeak() as watched:
    for _ in range(2):
      runners["train"]()
  peak = watched.peak_kib
  print(json.dumps({"footprint_mib": (peak - baseline) / 1024,
                    "step_growth_mib": (peak - between_steps) / 1024}))


def _inputs(args):
  import numpy as np  # pylint: disable=g-import-not-at-top  (after --malloc keep acts)

  rng = np.random.default_rng(0)
  batch = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
  return batch, rng.integers(0, 1000, args.batch).astype(np.int64)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def benchmark_model(name: str, args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  batch, labels = _inputs(args)
  torch_model, torch_kind = build_torch_model(name, args.official_file)
  runners = {"torch": torch_runners(torch_model, batch, labels)}
  runners["jax"], compile_seconds = jax_runners(name, torch_model, batch, labels,
                                                jax_options(args.jax_options), args.modes)
  result = {"model": name, "torch_model": torch_kind, "jax_compile_s": compile_seconds}
  for mode in args.modes:
    for _ in range(args.warmup):
      for framework in ("jax", "torch"):
        runners[framework][mode]()
    times = {"jax": [], "torch": []}
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both
      for framework in ("jax", "torch"):
        times[framework].append(timed(runners[framework][mode]))
    for framework, samples in times.items():
      result[f"{framework}_{mode}_img_s"] = args.batch / statistics.median(samples)
    result[f"{mode}_ratio"] = result[f"jax_{mode}_img_s"] / result[f"torch_{mode}_img_s"]
    # The ratio of each alternation round shows how steady the machine was: a spread
    # much wider than a few percent means the medians come from a noisy run.
    rounds = [t / j for j, t in zip(times["jax"], times["torch"])]
    result[f"{mode}_ratio_range"] = [min(rounds), max(rounds)]
  if not args.no_memory and "train" in args.modes:
    for framework in ("jax", "torch"):
      command = [sys.executable, os.path.abspath(__file__), "--memory-probe", framework, name,
                 "--batch", str(args.batch), "--size", str(args.size), "--malloc", args.malloc]
      if args.official_file:
        command += ["--official-file", args.official_file]
      if args.jax_options:
        command += ["--jax-options", *args.jax_options]
      if args.layers:
        command += ["--layers", *map(str, args.layers)]
      probe = subprocess.run(command, capture_output=True, text=True, check=True)
      measured = json.loads(probe.stdout.strip().splitlines()[-1])
      result[f"{framework}_train_footprint_mib"] = measured["footprint_mib"]
      result[f"{framework}_train_step_growth_mib"] = measured["step_growth_mib"]
  return result


def machine_description() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"({jax.default_backend()}: {jax.devices()[0].device_kind}), torch {torch.__version__}")


def at_depth(names, layers):
  """The models under their own names with `layers` blocks per stage (--layers), for the
  duration of a block; the registry as it is without --layers."""
  from spanet_jax.models import registry  # pylint: disable=g-import-not-at-top

  if not layers:
    return contextlib.nullcontext()
  return registry.registered(*(
      dataclasses.replace(info, architecture=dict(info.architecture, layers=tuple(layers)))
      for info in map(registry.model_info, names)))


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.layers and args.official_file:
    raise SystemExit("--layers builds our PyTorch reference; leave out --official-file")
  if args.official_file and not os.path.isfile(args.official_file):
    raise SystemExit(f"--official-file {args.official_file}: no such file (the official "
                     "repositories' image_classification/spanet.py or "
                     "image_classification/models/spanetv2.py, from a clone of "
                     "github.com/DoranLyong/SPANet-official or SPANetV2-official)")
  if args.malloc == "keep":  # before either framework starts a thread
    from spanet_jax.train import host_memory  # pylint: disable=g-import-not-at-top
    if not host_memory.keep_freed_memory():
      args.malloc = "default"
  names = [args.memory_probe[1]] if args.memory_probe else args.models
  with at_depth(names, args.layers):
    if args.memory_probe:
      memory_probe(*args.memory_probe, args)
      return
    print(f"machine: {machine_description()}")
    depth = (f", layers {' '.join(map(str, args.layers))} (not the models' own)"
             if args.layers else "")
    print(f"batch {args.batch}, {args.size}x{args.size}, float32, median of {args.repeats} "
          f"after {args.warmup} warm-up, malloc: {args.malloc}{depth}\n")
    header = (f"{'model':<10} {'torch':<9} {'mode':<8} {'jax img/s':>10} {'torch img/s':>12} "
              f"{'ratio':>6} {'per round':>11} {'jax compile s':>14}  memory MiB, jax / torch: "
              f"footprint, step growth")
    print(header)
    results = []
    for name in args.models:
      result = benchmark_model(name, args)
      results.append(result)
      for mode in args.modes:
        memory = ""
        if mode == "train" and "jax_train_footprint_mib" in result:
          memory = (f"  {result['jax_train_footprint_mib']:.0f} / "
                    f"{result['torch_train_footprint_mib']:.0f}, "
                    f"{result['jax_train_step_growth_mib']:.0f} / "
                    f"{result['torch_train_step_growth_mib']:.0f}")
        low, high = result[f"{mode}_ratio_range"]
        print(f"{name:<10} {result['torch_model']:<9} {mode:<8} "
              f"{result[f'jax_{mode}_img_s']:>10.2f} {result[f'torch_{mode}_img_s']:>12.2f} "
              f"{result[f'{mode}_ratio']:>6.2f} {f'{low:.2f}-{high:.2f}':>11} "
              f"{result['jax_compile_s'][mode]:>14.1f}{memory}", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"machine": machine_description(), "args": vars(args), "results": results},
                  f, indent=2)


if __name__ == "__main__":
  main()
