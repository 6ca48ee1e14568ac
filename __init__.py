"""``pip install`` entry point: the repository root is the package ``negative_prompt_inversion``.

The pipeline file stays a single top-level file (what diffusers' custom-pipeline loader and copy-paste users
need); this module only re-exports it under a unique package name, so nothing generic such as
``attention_processors`` lands at the top level of ``site-packages``.
"""

__all__ = [
    "InvalidInversionError",
    "InversionResult",
    "LocalBlend",
    "MasaCtrl",
    "NegativePromptInversionPipeline",
    "NegativePromptInversionPipelineOutput",
    "PromptToPrompt",
    "ProximalGuidance",
]
__version__ = "0.2.0"


def __getattr__(name):
    """The pipeline's names, imported on first use: ``npi-edit --help`` (this package's ``cli``) must not wait for
    torch, diffusers and transformers."""
    if name in __all__:
        from . import pipeline_negative_prompt_inversion

        return getattr(pipeline_negative_prompt_inversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
