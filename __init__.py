"""``pip install`` entry point: the repository root is the package ``negative_prompt_inversion``.

The pipeline file stays a single top-level file (what diffusers' custom-pipeline loader and copy-paste users
need); this module only re-exports it under a unique package name, so nothing generic such as
``attention_processors`` lands at the top level of ``site-packages``.
"""

# Only as the installed package: pytest imports this file bare (no parent package) when it walks the checkout.
if __package__:
    from .pipeline_negative_prompt_inversion import (
        InvalidInversionError,
        InversionResult,
        LocalBlend,
        MasaCtrl,
        NegativePromptInversionPipeline,
        NegativePromptInversionPipelineOutput,
        PromptToPrompt,
        ProximalGuidance,
    )

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
