"""Where a SPANetV2 model's time goes, part by part of its blocks, against PyTorch.

  python benchmarks/blocks.py --model spanetv2_s18_pure --malloc keep \
      --official-file SPANetV2-official/image_classification/models/spanetv2.py

For each stage it builds the parts of one block at the stage's shape (the token mixer,
the MLP, a LayerNorm) in both frameworks and times the forward pass and the forward
pass with the gradient of sum(y^2) with respect to the parameters and the input (JAX:
the Flax module under jax.jit; PyTorch: the module called eagerly, as the official
training script does), alternating between the frameworks after warm-up, each round
one untimed call and then a burst of calls. It prints the median milliseconds and the
JAX / PyTorch speed ratios, then each stage's blocks (mixer + MLP + two norms, times
the stage's depth) and the model's: the blocks alone, without downsampling, stem, head
or optimizer update.

The PyTorch side is our reference (spanet_jax.reference.spanetv2_torch) unless
--official-file names the official spanetv2.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import benchmark  # benchmarks/benchmark.py: the same machine line and official import

PARTS = ("mixer", "mlp", "norm")
NORMS_PER_BLOCK = 2


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="spanetv2_s18_pure")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=224, help="image size; stage s runs at "
                      "size / 2^(s + 2)")
  parser.add_argument("--stages", nargs="+", type=int, default=None, metavar="S",
                      help="only these stages (0-3)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5,
                      help="alternating rounds; each times a burst of --calls calls")
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--official-file", default=None,
                      help="the official spanetv2.py, to compare against it instead of our "
                           "PyTorch reference")
  parser.add_argument("--malloc", choices=["default", "keep"], default="default",
                      help="keep: glibc keeps freed memory, for both frameworks (as train.py "
                           "does on CPU)")
  return parser.parse_args(argv)


def torch_part(part: str, mixer: str, dim: int, size: int, official):
  """The PyTorch module of one block part, channels-last (B, H, W, C) in and out."""
  if official is not None:
    if part == "norm":
      return official.LayerNormWithoutBias(dim, eps=1e-6)
    if part == "mlp":
      return official.Mlp(dim)
    return {"exspam": lambda: official.ExSPAM(dim, size=size),
            "attention": lambda: official.Attention(dim),
            "mixattention": lambda: official.MixAttention(dim)}[mixer]()
  from spanet_jax.reference import spanetv2_torch as ref  # pylint: disable=g-import-not-at-top
  if part == "norm":
    return ref.ChannelsLastLayerNorm(dim, 1e-6, bias=False)
  if part == "mlp":
    return ref.Mlp(dim, 4 * dim, 0.0)
  if mixer == "exspam":
    return ref.ExSPAM(dim, size=size)
  return ref.Attention(dim, mix=mixer == "mixattention")


def jax_part(part: str, mixer: str, dim: int, size: int):
  from spanet_jax.models import layers, spanetv2  # pylint: disable=g-import-not-at-top
  if part == "norm":
    return layers.ChannelLayerNorm(epsilon=1e-6, use_bias=False)
  if part == "mlp":
    return spanetv2.StarReLUMlp(hidden_features=4 * dim)
  if mixer == "exspam":
    return spanetv2.ExSPAM((size, size))
  return spanetv2.Attention(mix=mixer == "mixattention")


def torch_runners(module, x):
  import torch  # pylint: disable=g-import-not-at-top

  inputs = torch.from_numpy(x)
  with_grad = inputs.clone().requires_grad_(True)

  def forward():
    with torch.no_grad():
      module(inputs)

  def gradient():
    for p in module.parameters():
      p.grad = None
    with_grad.grad = None
    (module(with_grad) ** 2).sum().backward()

  forward()  # PyTorch's first calls set up what later calls reuse
  gradient()
  return {"forward": forward, "gradient": gradient}


def jax_runners(module, part: str, x):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  inputs = jnp.asarray(x)
  extra = (False,) if part == "mlp" else ()  # the MLP takes `train`
  params = module.init(jax.random.PRNGKey(0), inputs, *extra)
  forward = jax.jit(lambda p, v: module.apply(p, v, *extra))
  gradient = jax.jit(jax.grad(lambda p, v: jnp.sum(module.apply(p, v, *extra) ** 2),
                              argnums=(0, 1)))
  runners = {"forward": lambda: jax.block_until_ready(forward(params, inputs)),
             "gradient": lambda: jax.block_until_ready(gradient(params, inputs))}
  for run in runners.values():  # compile outside the timed calls, whatever --warmup says
    run()
  return runners


def time_part(runners: dict, args) -> dict:
  """Median seconds per framework and mode, the frameworks alternating."""
  medians = {}
  for mode in ("forward", "gradient"):
    for _ in range(args.warmup):
      for framework in ("jax", "torch"):
        runners[framework][mode]()
    samples = {"jax": [], "torch": []}
    for _ in range(args.repeats):
      for framework in ("jax", "torch"):
        run = runners[framework][mode]
        # A call straight after the other framework's (or after idling) runs slower, the
        # worker threads waking up: some milliseconds, which would swamp a part this small.
        # So one untimed call, then the mean of a burst.
        run()
        samples[framework].append(
            sum(benchmark.timed(run) for _ in range(args.calls)) / args.calls)
    for framework, times in samples.items():
      medians[framework, mode] = statistics.median(times)
  return medians


def _row(label: str, t: dict) -> str:
  ms = lambda framework, mode: 1e3 * t[framework, mode]
  return (f"{label:36s} {ms('jax', 'forward'):9.2f} {ms('torch', 'forward'):9.2f} "
          f"{t['torch', 'forward'] / t['jax', 'forward']:6.2f}   "
          f"{ms('jax', 'gradient'):9.2f} {ms('torch', 'gradient'):9.2f} "
          f"{t['torch', 'gradient'] / t['jax', 'gradient']:6.2f}")


def _add(total: dict, part: dict, weight: int) -> None:
  for key, seconds in part.items():
    total[key] = total.get(key, 0.0) + weight * seconds


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.official_file and not os.path.isfile(args.official_file):
    raise SystemExit(f"--official-file {args.official_file}: no such file (the official "
                     "repository's image_classification/models/spanetv2.py)")
  stages = args.stages if args.stages is not None else range(4)
  if any(s not in range(4) for s in stages):
    raise SystemExit("--stages takes stage numbers 0 to 3")
  if args.malloc == "keep":  # before either framework starts a thread
    from spanet_jax.train import host_memory  # pylint: disable=g-import-not-at-top
    if not host_memory.keep_freed_memory():
      args.malloc = "default"
  from spanet_jax.models import registry  # pylint: disable=g-import-not-at-top

  try:
    info = registry.model_info(args.model)
  except ValueError as err:
    raise SystemExit(str(err)) from None
  if info.family != "spanetv2":
    raise SystemExit(f"{args.model} is not a SPANetV2 model")
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  official = benchmark.import_official(args.official_file) if args.official_file else None
  architecture = info.architecture
  print(f"machine: {benchmark.machine_description()}")
  print(f"{args.model} blocks against the {'official' if official else 'reference'} PyTorch "
        f"modules; batch {args.batch}, image {args.size}, float32, median of {args.repeats} "
        f"rounds of {args.calls} calls after {args.warmup} warm-up, malloc: {args.malloc}")
  print(f"{'ms':36s} {'jax fwd':>9s} {'torch fwd':>9s} {'ratio':>6s}   "
        f"{'jax grad':>9s} {'torch grad':>10s} {'ratio':>6s}")
  rng = np.random.default_rng(0)
  model_total = {}
  for stage in stages:
    dim = architecture["dims"][stage]
    depth = architecture["layers"][stage]
    mixer = architecture["token_mixers"][stage]
    size = args.size // 2 ** (stage + 2)
    x = rng.standard_normal((args.batch, size, size, dim)).astype(np.float32)
    stage_total = {}
    for part in PARTS:
      runners = {"torch": torch_runners(torch_part(part, mixer, dim, size, official), x),
                 "jax": jax_runners(jax_part(part, mixer, dim, size), part, x)}
      times = time_part(runners, args)
      label = mixer if part == "mixer" else part
      print(_row(f"stage {stage} ({dim} x {size}^2) {label}", times), flush=True)
      _add(stage_total, times, depth * (NORMS_PER_BLOCK if part == "norm" else 1))
    print(_row(f"stage {stage}: {depth} blocks", stage_total), flush=True)
    _add(model_total, stage_total, 1)
  print(_row("blocks of the stages above", model_total))


if __name__ == "__main__":
  main()
