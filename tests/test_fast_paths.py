"""The fast UNet path (`enable_cuda_graphs`): attention controls kept across calls, and exact results.

Graphs read a control's tensors in place, so a later call of the same structure must run on the earlier control
objects with its own values copied in. On the CPU the runner runs the UNet eagerly but adopts controls exactly as on
a GPU, so these tests check that no value of an earlier call leaks into a later one. The CUDA tests (marked
``gpu``: ``pytest -m gpu``) check graph replay and `torch.compile` against the eager path.
"""

import copy

import pytest
import torch
from conftest import StoredElsewhere, scene_image, tiny_components

from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    NegativePromptInversionPipeline,
    PromptToPrompt,
    ProximalGuidance,
)


STEPS = 6
SOURCE = "a red cat on a white background"

# Calls of one structure (P2P word swap + local blend, one target) with every per-call value changed, then other
# structures, then the first again.
CALLS = [
    dict(
        prompt="a red dog on a white background",
        attention_control=PromptToPrompt(0.6, 0.5, local_blend=LocalBlend(("cat", "dog"))),
    ),
    dict(
        prompt="a blue cat on a black background",
        attention_control=PromptToPrompt(
            (0.2, 0.8), 0.3, reweight={"blue": 2.0}, local_blend=LocalBlend(("cat", "cat"), threshold=0.5)
        ),
    ),
    dict(
        prompt="a big red cat on a white background",
        attention_control=PromptToPrompt(cross_replace_steps={"default_": 0.5, "big": 0.2}),
    ),
    dict(prompt="a red dog on a white background", attention_control=MasaCtrl(start_step=2)),
    dict(prompt="a red tiger on a white background", attention_control=MasaCtrl(start_step=4)),
    dict(prompt="a red tiger on a white background", attention_control=MasaCtrl(start_layer=0)),
    dict(prompt="a red dog on a white background", proximal_guidance="soft"),
    dict(
        prompt="a red dog on a white background",
        attention_control=PromptToPrompt(0.6, 0.5, local_blend=LocalBlend(("cat", "dog"))),
    ),
    # Direct Inversion: P2P's and MasaCtrl's structures (the pin is outside the UNet), with a pinned source
    dict(
        prompt="a red dog on a white background",
        inversion_method="direct",
        proximal_guidance="soft",
        attention_control=PromptToPrompt(0.5, 0.6, local_blend=LocalBlend(("cat", "dog"), threshold=0.4)),
    ),
    dict(
        prompt="a red tiger on a white background", inversion_method="direct", attention_control=MasaCtrl(start_step=2)
    ),
]
DIRECT = CALLS[-2:]


def edit(pipe, inversion, call):
    return pipe(inversion=inversion, output_type="latent", **call).images


@pytest.fixture(scope="module")
def reference(components):
    """Each call's result from a fresh eager pipeline."""
    pipe = NegativePromptInversionPipeline(**copy.deepcopy(components))
    pipe.set_progress_bar_config(disable=True)
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    return inversion, [edit(pipe, inversion, call) for call in CALLS]


def test_controls_are_reused_across_calls_without_leaking_values(pipe, reference):
    inversion, expected = reference
    pipe.enable_cuda_graphs()
    runner = pipe._cuda_graphs
    for call, want in zip(CALLS, expected):
        torch.testing.assert_close(edit(pipe, inversion, call), want, rtol=0, atol=0)
    # Structures: P2P with a store (swap and re-weighting alike, Direct Inversion's too); P2P without; MasaCtrl (its
    # step window is a tensor, so one structure) and MasaCtrl in other layers; no control.
    assert len(runner.controls) == 5
    defaults = dict(pipe.unet.attn_processors)
    assert all(type(proc).__name__ != "ControlledAttnProcessor" for proc in defaults.values())


def test_disable_returns_to_eager(pipe, reference):
    inversion, expected = reference
    pipe.enable_cuda_graphs()
    pipe.disable_cuda_graphs()
    assert pipe._cuda_graphs is None
    torch.testing.assert_close(edit(pipe, inversion, CALLS[0]), expected[0], rtol=0, atol=0)


def test_compile_argument_is_checked(pipe):
    with pytest.raises(ValueError, match="compile must be"):
        pipe.enable_cuda_graphs(compile="everything")
    assert pipe._cuda_graphs is None


def test_regional_compilation_stays_inside_the_graph_runner(pipe, reference):
    """Regional code is routed in only while the runner warms up and captures: the UNet itself stays eager for
    every other caller (CPU inputs here, NTI's gradient passes, other pipelines sharing it)."""
    inversion, expected = reference
    pipe.enable_cuda_graphs(compile="regional")
    runner = pipe._cuda_graphs
    names = {"BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
    blocks = [module for module in pipe.unet.modules() if type(module).__name__ in names]
    assert set(runner.regions) == set(blocks) and {"BasicTransformerBlock", "ResnetBlock2D"} <= {
        type(block).__name__ for block in blocks
    }
    torch.testing.assert_close(edit(pipe, inversion, CALLS[0]), expected[0], rtol=0, atol=0)
    with runner._compiled_regions():
        assert all(block._compiled_call_impl is runner.regions[block] for block in blocks)
    assert all(block._compiled_call_impl is None for block in blocks)


def test_cuda_graphs_refuse_an_fp8_unet(tokenizer_dir):
    """FP8 graphs did not reproduce eager FP8 edits on an H200, so graphs over quantised weights are refused up front
    (the stand-in takes the place of enable_fp8's torchao weights, which need an FP8 GPU)."""
    quantised = NegativePromptInversionPipeline(**tiny_components(tokenizer_dir))
    linear = next(module for module in quantised.unet.modules() if isinstance(module, torch.nn.Linear))
    linear.weight = torch.nn.Parameter(StoredElsewhere(linear.weight.detach().clone()), requires_grad=False)
    for compile in (False, True, "regional"):
        with pytest.raises(NotImplementedError, match=r"enable_cuda_graphs\(\): CUDA graphs over an FP8 UNet"):
            quantised.enable_cuda_graphs(compile=compile)
    assert quantised._cuda_graphs is None


def test_fp8_needs_a_cuda_gpu(pipe):
    weights = [module.weight for module in pipe.unet.modules() if isinstance(module, torch.nn.Linear)]
    with pytest.raises(RuntimeError, match="enable_fp8.*CUDA"):
        pipe.enable_fp8()
    assert [module.weight for module in pipe.unet.modules() if isinstance(module, torch.nn.Linear)] == weights


# --------------------------------------------------------------------------------------------------------------
# On a GPU: graph replay and torch.compile against the eager path


@pytest.fixture()
def gpu_pipes(tokenizer_dir):
    # Full float32 convolutions: with TF32 (cuDNN's default) eager, graphed, compiled and channels-last runs pick
    # different algorithms and differ by ~1e-3 after a few steps, which would hide real errors of that size.
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False

    def build():
        pipe = NegativePromptInversionPipeline(**tiny_components(tokenizer_dir)).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    yield build
    torch.backends.cudnn.allow_tf32 = allow_tf32


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True, "regional"])
def test_graphs_match_eager_on_cuda(gpu_pipes, compile):
    eager, fast = gpu_pipes(), gpu_pipes()
    fast.enable_cuda_graphs(compile=compile)
    inversions = [pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS) for pipe in (eager, fast)]
    torch.testing.assert_close(inversions[1].latents, inversions[0].latents, rtol=1e-3, atol=1e-3)
    calls = [CALLS[0], CALLS[3], CALLS[0]] if compile else CALLS + CALLS[:1]  # each new kind compiles for seconds
    for call in calls:  # the repeat replays graphs captured by the first call
        want, got = (edit(pipe, inv, call) for pipe, inv in zip((eager, fast), inversions))
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert fast._cuda_graphs.graphs  # something was captured


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True, "regional"])
def test_direct_inversion_graphs_match_eager_and_pin_the_source_exactly_on_cuda(gpu_pipes, compile):
    eager, fast = gpu_pipes(), gpu_pipes()
    fast.enable_cuda_graphs(compile=compile)
    inversions = [
        pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS, inversion_method="direct")
        for pipe in (eager, fast)
    ]
    calls = [DIRECT[0], DIRECT[0]] if compile else DIRECT + DIRECT[:1]  # the repeat replays the captured graphs
    for call in calls:
        want, got = (edit(pipe, inv, call) for pipe, inv in zip((eager, fast), inversions))
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    seen = []

    def record(pipe_, i, t, tensors):
        seen.append(tensors["latents"][0].clone())
        return tensors

    edit(fast, inversions[1], dict(DIRECT[0], callback_on_step_end=record))
    trajectory = inversions[1].latents[0].cuda()
    assert all(torch.equal(latent, trajectory[STEPS - 1 - i]) for i, latent in enumerate(seen))  # pinned outside
    assert fast._cuda_graphs.graphs


@pytest.mark.gpu
def test_graphs_follow_a_moved_or_recast_unet(gpu_pipes):
    pipe = gpu_pipes()
    pipe.enable_cuda_graphs()
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    before = edit(pipe, inversion, CALLS[0])
    captured = len(pipe._cuda_graphs.graphs)
    pipe.unet.to(memory_format=torch.channels_last)  # new weight storage: graphs must be recaptured
    after = edit(pipe, inversion, CALLS[0])
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)
    assert len(pipe._cuda_graphs.graphs) == captured + 1


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_denoising_loop_never_waits_for_the_host(gpu_pipes, graphs):
    pipe = gpu_pipes()
    if graphs:
        pipe.enable_cuda_graphs()
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)

    def forbid_syncs(pipe_, i, t, tensors):  # from the end of step 0 (graphs captured) until decoding
        torch.cuda.set_sync_debug_mode("error" if i < STEPS - 1 else "default")
        return {}

    try:
        prox = dict(CALLS[6], proximal_guidance=ProximalGuidance(reconstruction_guidance=True))
        for call in (CALLS[0], CALLS[3], prox, DIRECT[0]):
            edit(pipe, inversion, dict(call, callback_on_step_end=forbid_syncs))
    finally:
        torch.cuda.set_sync_debug_mode("default")


fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@fp8
def test_fp8_unet_stays_close_to_bfloat16_and_refuses_graphs(tokenizer_dir):
    """Every linear layer of the tiny UNet (widths multiples of 16) becomes FP8, once; its output stays within FP8's
    rounding of bfloat16's; CUDA graphs over it are refused, either way round."""
    pytest.importorskip("torchao")
    reference, quantized = (
        NegativePromptInversionPipeline(**tiny_components(tokenizer_dir)).to("cuda", torch.bfloat16) for _ in range(2)
    )
    linear = [module for module in quantized.unet.modules() if isinstance(module, torch.nn.Linear)]
    assert quantized.enable_fp8() == len(linear)
    assert quantized.enable_fp8() == len(linear)  # nothing is quantised twice
    generator = torch.Generator("cuda").manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.bfloat16, generator=generator),
        timestep=torch.tensor(500, device="cuda"),
        encoder_hidden_states=torch.randn(2, 77, 32, device="cuda", dtype=torch.bfloat16, generator=generator),
    )
    with torch.no_grad():
        want, got = (pipe.unet(**inputs).sample for pipe in (reference, quantized))
    # float8_e4m3fn keeps 3 mantissa bits: each product's operands round by up to 2^-4 relative; a wrong scale or
    # layout moves the output by O(1)
    assert relative_error(got, want) < 2**-3
    with pytest.raises(NotImplementedError, match="FP8 UNet"):
        quantized.enable_cuda_graphs(compile="regional")
    reference.enable_cuda_graphs()
    with pytest.raises(NotImplementedError, match="disable_cuda_graphs"):
        reference.enable_fp8()
