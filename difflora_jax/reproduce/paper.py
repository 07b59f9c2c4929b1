"""The paper's reported numbers (arXiv:2507.23588, as transcribed in ../shared/spec/difflora.md
sections 8 and 9), for side-by-side tables. They are the paper's measurements on
Llama-3.2-1B-Instruct, not outputs of this code."""

from __future__ import annotations

# Figure 1 (OLMES general abilities).
GENERAL_TASKS = (
    "TruthfulQA",
    "PopQA",
    "BoolQ",
    "HumanEval",
    "DROP",
    "GSM8K",
    "BBH",
    "ARC-C",
    "Avg",
)
GENERAL = {
    "base": (0.46, 0.14, 0.68, 0.64, 0.29, 0.40, 0.37, 0.43, 0.43),
    "lora-r8": (0.42, 0.15, 0.76, 0.53, 0.33, 0.36, 0.35, 0.43, 0.42),
    "difflora-64": (0.49, 0.14, 0.73, 0.64, 0.26, 0.35, 0.36, 0.45, 0.43),
    "difflora-64-fixed-lambda": (0.44, 0.14, 0.72, 0.61, 0.26, 0.36, 0.36, 0.45, 0.42),
    "difflora-32": (0.47, 0.14, 0.71, 0.61, 0.26, 0.35, 0.37, 0.44, 0.42),
    "difflora-32-gn": (0.49, 0.00, 0.39, 0.00, 0.01, 0.01, 0.02, 0.24, 0.15),
}

# The RAG table (top-5 documents, LLM judge); "lora-r8" is the paper's FullLoRA row.
RAG_TASKS = ("BioASQ", "FiQA", "KILT-NQ", "PopQA", "TechQA", "Avg")
RAG = {
    "base": (0.678, 0.483, 0.594, 0.494, 0.532, 0.556),
    "lora-r8": (0.728, 0.527, 0.666, 0.528, 0.556, 0.601),
    "difflora-64": (0.629, 0.520, 0.611, 0.451, 0.390, 0.520),
    "difflora-64-fixed-lambda": (0.638, 0.511, 0.619, 0.495, 0.407, 0.534),
    "difflora-32": (0.585, 0.511, 0.621, 0.479, 0.344, 0.508),
    "difflora-32-gn": (0.025, 0.097, 0.031, 0.041, 0.059, 0.051),
}

# Section 9: trainable parameters on Llama-3.2-1B (16 layers), computed from the shapes.
PARAMS_LLAMA_3_2_1B = {
    "lora-r8": 5_636_096,
    "difflora-64": 6_819_840,
    "difflora-32": 6_819_840,
    "difflora-32-gn": 6_820_864,
    "reference-quickstart": 6_816_768,
}

# The paper's qualitative findings (spec section 8), checked one by one in docs/results.md.
FINDINGS = (
    "LoRA beats DiffLoRA on most tasks",
    "DiffLoRA is ahead of LoRA on HumanEval (0.64 vs 0.53)",
    "DiffLoRA is ahead on multi-value needle retrieval",
    "many-shot ICL degrades with more demonstrations",
    "DiffLoRA-32 + GN destroys the pretrained model (near-zero scores)",
    "DiffLoRA sometimes generates degenerate text",
    "attention mass on BOS drops slightly and the context around the needle is denoised",
)
