"""The paper's tables and figures, one command each: ``difflora reproduce ARTIFACT --preset
PRESET`` trains (or reuses) every variant of the preset, runs the evaluations the artifact needs
and writes its markdown table and plots (``pipeline``). Presets: ``presets``; artifacts:
``artifacts``; checkpoints and scores shared across artifacts: ``runner``."""

from difflora_jax.reproduce.artifacts import ALL, ARTIFACTS
from difflora_jax.reproduce.pipeline import dry_run_preset, reproduce
from difflora_jax.reproduce.presets import EvalPlan, Preset, load_preset, preset_names
from difflora_jax.reproduce.runner import Job, Reproduction

__all__ = [
    "ALL",
    "ARTIFACTS",
    "EvalPlan",
    "Job",
    "Preset",
    "Reproduction",
    "dry_run_preset",
    "load_preset",
    "preset_names",
    "reproduce",
]
