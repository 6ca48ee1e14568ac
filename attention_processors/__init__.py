"""Attention processors used by `NegativePromptInversionPipeline`.

Each module here is a *leaf*: it imports only torch and never another leaf, because diffusers' custom-pipeline
loader copies the leaves the pipeline file imports but neither runs this ``__init__`` nor follows a leaf's own
imports. The pipeline wires leaves together by passing objects, not by import.

- ``npi_controlled_attention``: the processor shell (stock fused attention around a pluggable attention rule).
- ``npi_prompt_to_prompt``: prompt-to-prompt token maps, edits and attention rules.
- ``npi_attention_store``: cross-attention store, local blend and heat-map visualisation.
- ``npi_mutual_self_attention``: MasaCtrl's mutual self-attention rule.
"""
