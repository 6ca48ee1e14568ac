"""How much of the GPU a benchmark row uses, and where the rest of its time goes.

Shared by ``speed.py`` and ``batch.py`` (and ``kernels.py``, which times the kernel choices the profile points at
next). Nothing here changes the pipeline: components are timed from outside, by wrapping ``pipe._predict_noise`` (every UNet evaluation, replayed CUDA
graphs included) and hooking the VAE's encoder and decoder and the text encoders.

- **Peak**: the median rate of a large bfloat16 matrix product (8192³, random data, CUDA events), measured in the
  same process as the rows it divides (on a CPU: float32, 1024³, a smoke-test stand-in).
- **UNet work**: FLOPs of one UNet forward per sample, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
  eager UNet with its default attention processors (convolutions, matrix products, fused attention), and the shapes
  of its attention calls. A UNet forward's FLOPs are linear in its batch (every layer acts per sample), so a row's
  UNet FLOPs are this count times the samples of its gradient-free UNet calls (``pipe.count_unet_calls()``). The
  extra attention work of attention control (prompt-to-prompt's second fused attention on target rows, the stored
  maps) is not counted: the figure is the useful work of the denoising, the same for every method.
- **Breakdown**: the components of each timed run (CUDA events on a GPU: time on the GPU's timeline; host-side
  ``perf_counter`` on a CPU), reported for the run at the median: UNet, VAE, text encoders, and the rest of the
  wall-clock time ("other": the pipeline's own per-step work, host-side Python, transfers, PIL). The UNet's attention share is the fused
  attention kernels timed alone at the row's shapes (every attention call of its UNet calls, default backend).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


# =================================================================================================================
# Timing on either device


class _Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no host sync until `seconds`), perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def time_median(fn, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup``, each timed on its own."""
    clock = _Clock(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        times.append(clock.seconds(start, clock.mark()))
    return statistics.median(times)


# =================================================================================================================
# Peak


def measure_peak(device: torch.device, size: int | None = None, repeats: int = 10) -> dict:
    """TFLOP/s of one large matrix product on random data: bfloat16 on a GPU (the dtype the rows compare with;
    float16 runs at the same rate there), float32 on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
    seconds = time_median(lambda: a @ b, device, repeats=repeats if device.type == "cuda" else 5)
    return {"peak_tflops": 2 * size**3 / seconds / 1e12, "peak_matmul": f"{size}³ {str(dtype).split('.')[-1]}"}


# =================================================================================================================
# UNet work


def unet_inputs(pipe, batch: int, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random inputs of one UNet forward at ``size`` px (SDXL: with its added conditioning)."""
    unet = pipe.unet
    generator = torch.Generator(device).manual_seed(0)
    latent = size // pipe.vae_scale_factor
    inputs = {
        "sample": torch.randn(
            batch, unet.config.in_channels, latent, latent, device=device, dtype=dtype, generator=generator
        ),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(
            batch,
            pipe.tokenizer.model_max_length,
            unet.config.cross_attention_dim,
            device=device,
            dtype=dtype,
            generator=generator,
        ),
    }
    if pipe.is_sdxl:
        pooled = torch.randn(
            batch, pipe.text_encoder_2.config.projection_dim, device=device, dtype=dtype, generator=generator
        )
        inputs["added_cond_kwargs"] = pipe._added_conditioning(pooled, (size, size))
    return inputs


class _AttentionCalls(TorchDispatchMode):
    """The (query, key, value) shapes and dtype of every fused attention call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.name():
            self.calls.append((*(tuple(t.shape) for t in args[:3]), args[0].dtype))
        return func(*args, **(kwargs or {}))


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


@torch.no_grad()
def unet_work(pipe, size: int, device: torch.device, dtype: torch.dtype, batch: int = 1) -> dict:
    """FLOPs per sample of one eager UNet forward (default attention processors) and its attention calls."""
    # torch counts the GPU's fused attention kernels but not the CPU's
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    custom = {cpu_attention: _cpu_attention_flops} if cpu_attention is not None else {}
    inputs = unet_inputs(pipe, batch, size, device, dtype)
    with FlopCounterMode(display=False, custom_mapping=custom) as counter, _AttentionCalls() as attention:
        pipe.unet(**inputs, return_dict=False)
    return {
        "flops_per_sample": counter.get_total_flops() / batch,
        "attention_calls": [(q[1:], k[1:], v[1:], dtype) for q, k, v, dtype in attention.calls],  # per sample
    }


class AttentionTimes:
    """Seconds of a UNet call's fused attention kernels, timed alone at its shapes, per batch size and backend."""

    def __init__(self, calls: list, device: torch.device):
        self.calls, self.device = Counter(calls), device
        self.cache: dict = {}

    def per_call(self, batch: int, backend=None) -> float | None:
        """One UNet call of ``batch`` samples; `None` where ``backend`` cannot run one of its shapes."""
        key = (batch, backend)
        if key not in self.cache:
            self.cache[key] = self._time(batch, backend)
        return self.cache[key]

    def _time(self, batch: int, backend) -> float | None:
        total = 0.0
        choice = contextlib.nullcontext() if backend is None else torch.nn.attention.sdpa_kernel([backend])
        try:
            with choice:
                for (q, k, v, dtype), count in self.calls.items():
                    tensors = [torch.randn(batch, *shape, device=self.device, dtype=dtype) for shape in (q, k, v)]
                    total += count * time_median(
                        lambda: F.scaled_dot_product_attention(*tensors), self.device, repeats=5, warmup=2
                    )
        except RuntimeError:  # "No available kernel": this backend rejects a shape or dtype
            return None
        return total

    def for_calls(self, samples_per_call: dict, backend=None) -> float | None:
        """Seconds of attention in UNet calls ``{batch size: number of calls}``."""
        times = [(self.per_call(int(batch), backend), count) for batch, count in samples_per_call.items()]
        if any(seconds is None for seconds, _ in times):
            return None
        return sum(seconds * count for seconds, count in times)


# =================================================================================================================
# Breakdown of one run


class ComponentTimer:
    """Times the pipeline's components during one run (see the module docstring). ``unet_via``: ``"pipeline"``
    (wrap ``pipe._predict_noise``, which sees CUDA-graph replays) or ``"hooks"`` (forward hooks on the UNet: for
    peers that call the UNet themselves, eagerly)."""

    def __init__(self, pipe, device: torch.device, unet_via: str = "pipeline"):
        self.pipe, self.clock, self.unet_via = pipe, _Clock(device), unet_via
        self.marks: dict[str, list] = {}
        self.handles: list = []

    def _span(self, name: str, start: bool) -> None:
        marks = self.marks.setdefault(name, [])
        if start:
            marks.append([self.clock.mark(), None])
        else:
            marks[-1][1] = self.clock.mark()

    def _hook(self, module, name: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda *_: self._span(name, True)))
        self.handles.append(module.register_forward_hook(lambda *_: self._span(name, False)))

    def __enter__(self):
        pipe = self.pipe
        for name, module in (
            ("vae", getattr(pipe.vae, "encoder", None)),
            ("vae", getattr(pipe.vae, "decoder", None)),
            ("text_encoders", getattr(pipe, "text_encoder", None)),
            ("text_encoders", getattr(pipe, "text_encoder_2", None)),
        ):
            if module is not None:
                self._hook(module, name)
        if self.unet_via == "hooks":
            self._hook(pipe.unet, "unet")
        else:
            predict = pipe._predict_noise

            def timed_predict(*args, **kwargs):
                self._span("unet", True)
                try:
                    return predict(*args, **kwargs)
                finally:
                    self._span("unet", False)

            pipe._predict_noise = timed_predict  # an instance attribute over the method, removed on exit
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.pipe.__dict__.pop("_predict_noise", None)

    def breakdown(self, wall: float) -> dict[str, float]:
        """Seconds of UNet, VAE and text encoders in the run just timed, and the rest of its ``wall`` seconds."""
        parts = {
            name: sum(self.clock.seconds(start, end) for start, end in self.marks.get(name, ()) if end is not None)
            for name in ("unet", "vae", "text_encoders")
        }
        return {
            "wall_s": wall,
            **{f"{name}_s": seconds for name, seconds in parts.items()},
            "other_s": wall - sum(parts.values()),
        }


def row_utilisation(row: dict, work: dict | None, peak: dict | None, attention: AttentionTimes | None) -> dict:
    """UNet TFLOP/s of a timed row (its gradient-free UNet samples × FLOPs per sample / median seconds), that as a
    fraction of the peak, the same over the UNet's own time from the breakdown, and the attention seconds."""
    samples = row.get("unet_samples_no_grad")
    if not (work and samples and row.get("median_s")):
        return {}
    flops = work["flops_per_sample"] * samples
    result = {"unet_tflop": flops / 1e12, "unet_tflops": flops / row["median_s"] / 1e12}
    if peak:
        result["peak_fraction"] = result["unet_tflops"] / peak["peak_tflops"]
    parts = row.get("breakdown") or {}
    if parts.get("unet_s"):
        result["unet_tflops_in_unet"] = flops / parts["unet_s"] / 1e12
    if attention is not None and row.get("samples_per_call_no_grad"):
        result["attention_s"] = attention.for_calls(row["samples_per_call_no_grad"])
    return result


def format_breakdown(row: dict) -> str:
    """``UNet 0.61 (attn 0.12) / VAE 0.05 / text 0.01 / other 0.07`` in seconds."""
    parts = row.get("breakdown")
    if not parts:
        return ""
    attention = row.get("attention_s")
    unet = f"UNet {parts['unet_s']:.3f}" + (f" (attn {attention:.3f})" if attention is not None else "")
    return f"{unet} / VAE {parts['vae_s']:.3f} / text {parts['text_encoders_s']:.3f} / other {parts['other_s']:.3f}"


def format_utilisation(row: dict) -> tuple[str, str]:
    """The table's two cells: UNet TFLOP/s (and, in brackets, over the UNet's own time) and % of peak."""
    if row.get("unet_tflops") is None:
        return "", ""
    rate = f"{row['unet_tflops']:.0f}" if row["unet_tflops"] >= 10 else f"{row['unet_tflops']:.3g}"
    if row.get("unet_tflops_in_unet"):
        inner = row["unet_tflops_in_unet"]
        rate += f" ({inner:.0f})" if inner >= 10 else f" ({inner:.3g})"
    share = f"{row['peak_fraction']:.1%}" if row.get("peak_fraction") is not None else ""
    return rate, share


def compile_stats() -> dict:
    """Dynamo's running totals in this process (private counters, so best effort): graphs compiled, and seconds in
    its compile entry point (tracing, AOT and inductor, Triton's kernel builds included)."""
    try:
        from torch._dynamo.utils import compile_times, counters

        names, values = compile_times(repr="csv", aggregate=True)
        seconds = dict(zip(names, values)).get("_compile.compile_inner")
        return {
            "graphs_compiled": int(counters["stats"]["unique_graphs"]),
            "compile_s": float(seconds) if seconds is not None else None,
        }
    except Exception:  # noqa: BLE001
        return {}
