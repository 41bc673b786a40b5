"""hpt_fast: fused kernels and a lean trainer for the Unified Policy Gradient Estimator and HPT."""
from hpt_fast.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from hpt_fast.causal_lm_loss import patch_causal_lm_loss
from hpt_fast.estimator import LOSS_AGGS, PRESETS, Estimator, get_estimator, preset_table
from hpt_fast.hpt import (
    BatchRows, SFTThenRL, assemble_hpt_rows, assemble_luffy_rows, assemble_rl_rows, assemble_sft_rows, hpt_gate,
)
from hpt_fast.loss import FusedUnifiedLoss
from hpt_fast.ops import fused_linear_loss, fused_token_logprobs

__all__ = [
    "fused_token_logprobs", "fused_linear_loss", "FusedUnifiedLoss", "patch_causal_lm_loss",
    "get_estimator", "Estimator", "PRESETS", "LOSS_AGGS", "preset_table",
    "compute_advantages", "ADVANTAGE_ESTIMATORS",
    "hpt_gate", "assemble_hpt_rows", "assemble_luffy_rows", "assemble_rl_rows", "assemble_sft_rows",
    "BatchRows", "SFTThenRL",
]
__version__ = "0.1.0"
