"""CogVideoX transformer forward: diffusers (PyTorch, SDPA) vs ours (JAX, jitted), same process.

Same device, same inputs, same weights: the diffusers ``CogVideoXTransformer3DModel`` is built with
its default random init, its state dict is converted with ``convert.cogvideox`` into our
``CogVideoXDiT``, and both run one denoiser call on the same latents / timesteps / text. After one
warm-up each, the two are timed alternately ``--repeats`` times (ours with ``block_until_ready``,
diffusers with ``torch.cuda.synchronize`` on GPU) and the medians are compared. Also prints the
output difference (a wiring check, not a parity test), XLA's FLOP count, compile time, memory and MFU.

    python benchmarks/compare_diffusers.py --preset cpu-medium   # dev box, float32, ~2 minutes
    python benchmarks/compare_diffusers.py --preset gpu-2b       # full 2B, 13x60x90 latents, CFG batch 2, bf16
    python benchmarks/compare_diffusers.py --dtype bfloat16      # both models in another dtype than the preset's
    python benchmarks/compare_diffusers.py --preset gpu-2b --layers 2 --repeats 1   # the 2B's path, 2 blocks

For a one-core comparison pin the whole process (``taskset -c 0 ... --threads 1``): XLA:CPU ignores
``--xla_cpu_multi_thread_eigen=false`` for its matmuls (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import load_average, memory_line, mfu_line, total_flops  # noqa: E402

from convert import cogvideox  # noqa: E402
from jax_repvideo import compilation_cache  # noqa: E402
from jax_repvideo.models.dit import DiTConfig, jit_forward  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    model: dict  # diffusers constructor arguments (DiTConfig field names)
    latent: tuple[int, int, int]  # (frames, height, width) latent size
    batch: int
    dtype: str  # "float32" | "bfloat16"
    repeats: int
    scan: bool  # lax.scan over stacked layers, or an unrolled loop over per-block params


PRESETS = {
    # ~40 GFLOP per call: 4 layers of width 512, 664 joint tokens, batch 2.
    "cpu-medium": Preset(
        model=dict(num_attention_heads=8, attention_head_dim=64, time_embed_dim=256, text_embed_dim=512,
                   num_layers=4, sample_width=30, sample_height=20, sample_frames=13, max_text_seq_length=64),
        latent=(4, 20, 30), batch=2, dtype="float32", repeats=5, scan=False),
    # CogVideoX-2B as released: 30 layers, 30 heads × 64, 226 text tokens, 13 × 30 × 45 video tokens.
    "gpu-2b": Preset(model={}, latent=(13, 60, 90), batch=2, dtype="bfloat16", repeats=7, scan=True),
}


def build_diffusers(preset: Preset, torch_device: str, torch_dtype):
    import torch
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    with torch.device(torch_device):
        model = CogVideoXTransformer3DModel(**preset.model)
    return model.to(torch_dtype).eval()


def build_ours(torch_model, cfg: DiTConfig, dtype, attention: str, scan: bool):
    state = {k: v.detach().float().cpu().numpy() for k, v in torch_model.state_dict().items()}
    flat = cogvideox.convert_diffusers_state(state, cfg)
    del state
    return cogvideox.model_from_params(cfg, flat, dtype=dtype, param_dtype=dtype,
                                       attention_backend=attention, scan_layers=scan)


def counted_flops(cfg: DiTConfig, dtype, args) -> float | None:
    """FLOPs of one forward, from XLA's cost analysis of an abstract (no memory) unrolled model with
    dense attention: a compiled ``lax.scan`` is counted as ONE trip of its body, and cuDNN attention
    is a custom call that cost analysis counts as zero."""
    model = cogvideox.abstract_model(cfg, dtype=dtype, param_dtype=dtype, attention_backend="xla",
                                     scan_layers=False)
    forward, state = jit_forward(model)
    return total_flops(forward.lower(state, *args))


def inputs(preset: Preset, cfg: DiTConfig):
    rng = np.random.default_rng(1)
    frames, height, width = preset.latent
    b = preset.batch
    latents = rng.standard_normal((b, frames, cfg.in_channels, height, width), np.float32)
    text = rng.standard_normal((b, cfg.max_text_seq_length, cfg.text_embed_dim), np.float32)
    timesteps = np.linspace(999, 1, b).astype(np.float32)  # CFG-like pair of different steps
    return latents, text, timesteps


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-medium")
    parser.add_argument("--repeats", type=int, help="timed pairs (default: the preset's)")
    parser.add_argument("--attention", default="auto", help="our attention backend: auto|xla|chunked|cudnn")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction,
                        help="lax.scan over stacked layers (--no-scan: unrolled, per-block params; "
                             "default: the preset's, unrolled on CPU where the scan's weight slices cost)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute dtype of both models (default: the preset's)")
    parser.add_argument("--layers", type=int, help="transformer blocks (default: the preset's), e.g. a short "
                                                   "gpu-2b run on a CPU")
    args = parser.parse_args(argv)
    compilation_cache.enable()  # only when JAX_REPVIDEO_COMPILATION_CACHE is set

    import torch

    preset = PRESETS[args.preset]
    repeats = args.repeats or preset.repeats
    scan = preset.scan if args.scan is None else args.scan
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = jax.default_backend() == "gpu"
    torch_device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    if on_gpu != (torch_device == "cuda"):
        print("warning: JAX and PyTorch are on different devices", file=sys.stderr)
    if args.dtype:
        preset = dataclasses.replace(preset, dtype=args.dtype)
    if args.layers:
        preset = dataclasses.replace(preset, model={**preset.model, "num_layers": args.layers})
    bf16 = preset.dtype == "bfloat16"
    torch_dtype, jax_dtype = (torch.bfloat16, jnp.bfloat16) if bf16 else (torch.float32, jnp.float32)

    start = time.perf_counter()
    torch_model = build_diffusers(preset, torch_device, torch_dtype)
    cfg = cogvideox.config_from_diffusers(dict(torch_model.config))
    ours = build_ours(torch_model, cfg, jax_dtype, args.attention, scan)
    build_s = time.perf_counter() - start

    latents, text, timesteps = inputs(preset, cfg)
    t_latents = torch.from_numpy(latents).to(torch_device, torch_dtype)
    t_text = torch.from_numpy(text).to(torch_device, torch_dtype)
    t_steps = torch.from_numpy(timesteps).to(torch_device)
    j_latents = jnp.asarray(latents.transpose(0, 1, 3, 4, 2), jax_dtype)
    j_text = jnp.asarray(text, jax_dtype)
    j_steps = jnp.asarray(timesteps)

    def run_torch():
        with torch.inference_mode():
            out = torch_model(hidden_states=t_latents, encoder_hidden_states=t_text, timestep=t_steps,
                              return_dict=False)[0]
        if torch_device == "cuda":
            torch.cuda.synchronize()
        return out

    forward, state = jit_forward(ours)
    start = time.perf_counter()
    compiled = forward.lower(state, j_latents, j_steps, j_text).compile()
    compile_s = time.perf_counter() - start

    def run_ours():
        return jax.block_until_ready(compiled(state, j_latents, j_steps, j_text))

    ref = run_torch().float().cpu().numpy()  # warm-ups
    out = np.asarray(run_ours(), np.float32).transpose(0, 1, 4, 2, 3)
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())

    torch_times, our_times = [], []
    for _ in range(repeats):  # alternate so both see the same machine load
        torch_times.append(timed(run_torch))
        our_times.append(timed(run_ours))
    t_torch, t_ours = statistics.median(torch_times), statistics.median(our_times)
    ratio = t_torch / t_ours

    device = jax.devices()[0]
    flops = counted_flops(cfg, jax_dtype, (j_latents, j_steps, j_text))
    flops_compiled = total_flops(compiled)
    frames, height, width = preset.latent
    tokens = cfg.max_text_seq_length + frames * (height // cfg.patch_size) * (width // cfg.patch_size)
    import diffusers

    print(f"device        {device.device_kind} ({jax.default_backend()}); torch on {torch_device}")
    print(f"versions      jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"diffusers {diffusers.__version__}")
    print(f"{load_average()}")
    print(f"preset        {args.preset}: {cfg.num_layers} layers, {cfg.num_attention_heads}x{cfg.attention_head_dim}, "
          f"latents {preset.batch}x{frames}x{height}x{width}, {tokens} joint tokens, {preset.dtype}, "
          f"attention={args.attention}, {'scan' if scan else 'unrolled'}")
    print(f"build         {build_s:.1f} s (diffusers init + conversion)")
    print(f"compile       {compile_s:.2f} s (ours)")
    print(f"diffusers     {t_torch * 1e3:.1f} ms per step (median of {repeats}; "
          f"all {', '.join(f'{t * 1e3:.0f}' for t in torch_times)})")
    print(f"ours          {t_ours * 1e3:.1f} ms per step (median of {repeats}; "
          f"all {', '.join(f'{t * 1e3:.0f}' for t in our_times)})")
    print(f"ratio         {ratio:.3f}x (diffusers time / ours; >1 = ours faster)")
    print(f"output diff   {rel:.2e} max|ours-diffusers|/max|diffusers|")
    if flops:
        print(f"FLOPs         {flops / 1e9:.2f} GFLOP per call (XLA cost analysis, unrolled + dense attention; "
              f"the compiled executable, whose loops count once, reports {flops_compiled / 1e9:.2f}), "
              f"ours {flops / t_ours / 1e12:.3f} TFLOP/s, diffusers {flops / t_torch / 1e12:.3f} TFLOP/s")
    print(mfu_line(flops, t_ours, device, bf16))
    print(memory_line(compiled, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
