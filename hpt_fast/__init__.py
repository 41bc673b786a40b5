"""hpt_fast: fused kernels and a lean trainer for the Unified Policy Gradient Estimator and HPT."""
from hpt_fast.ops import fused_linear_loss, fused_token_logprobs

__all__ = ["fused_token_logprobs", "fused_linear_loss"]
__version__ = "0.1.0"
