"""The module DeepSpeed trains: a causal LM whose forward ends in the fused head, not in logits.

``FusedHeadPolicy.forward`` runs the model's trunk (``logit_head.trunk_name``) and hands its last hidden
states and the output embedding to the fused op, so no [tokens x vocab] tensor exists. Running
this inside DeepSpeed's ``engine(...)`` rather than calling the trunk directly matters for ZeRO:

- the engine's forward is where ZeRO starts a new micro-step (stage 3 overwrites instead of
  accumulating gradients when that bookkeeping is skipped);
- under ZeRO-3 a parameter is gathered only when a module that owns (or declares) it runs. The
  lm_head module itself never runs here, so its weight is declared an external parameter of this
  module (``deepspeed.zero.register_external_parameter``): gathered for this forward and its
  backward, released after, with its gradient reduce-scattered like any other.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from hpt_fast import zero3
from hpt_fast.batching import MicroBatch
from hpt_fast.estimator import Normalizers
from hpt_fast.logit_head import logit_transform, trunk_name
from hpt_fast.loss import FusedUnifiedLoss
from hpt_fast.ops import fused_token_logprobs


class FusedHeadPolicy(nn.Module):
    """Wraps a transformers causal LM (``Qwen2ForCausalLM``, ``LlamaForCausalLM``, ...) as ``lm``.

    ``lm`` stays the object to save (``save_pretrained``) and to generate with; this wrapper only
    adds the forward the trainer needs. ``op_kwargs``: the fused op's settings for the forward
    without a loss (``FusedOpConfig.op_kwargs``; a loss carries its own). What the model does to
    its logits after lm_head (a scale, a soft cap: ``hpt_fast.logit_head``) is the fused head's
    temperature and soft cap, so the log-probs trained are those of the logits the model samples
    from; a head the op cannot compute (not a plain ``nn.Linear``) is refused.
    """

    def __init__(self, lm: nn.Module, op_kwargs: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.transform = logit_transform(lm)
        self.trunk = trunk_name(lm)
        self.lm = lm
        self.op_kwargs = dict(op_kwargs or {})

    def head_parameters(self) -> list[nn.Parameter]:
        """The output embedding's weight (and bias), which the fused op reads directly."""
        head = self.lm.get_output_embeddings()
        return [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]

    def declare_head_to_zero3(self) -> None:
        """Under ZeRO-3: have DeepSpeed gather the head's parameters around this module's forward."""
        import deepspeed

        for p in self.head_parameters():
            deepspeed.zero.register_external_parameter(self, p)

    def hidden(self, mb: MicroBatch) -> Tensor:
        """[B, T, H]: the trunk's last hidden state at each position that predicts a target."""
        # no KV cache: nothing decodes after this forward
        out = getattr(self.lm, self.trunk)(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        return out.last_hidden_state[:, :-1]

    def forward(
        self,
        mb: MicroBatch,
        loss_fn: Optional[FusedUnifiedLoss] = None,
        *,
        temperature: float = 1.0,
        old_logp: Optional[Tensor] = None,
        normalizers: Optional[Normalizers] = None,
    ):
        """With ``loss_fn``: its (loss, stats) on the micro-batch (see ``FusedUnifiedLoss``).

        Without: the per-token log-probs [B, T] float32 of ``mb.targets`` at ``temperature``
        (0 at ignored positions), e.g. the old policy's under ``torch.no_grad``.
        """
        head = self.lm.get_output_embeddings()
        softcap = self.transform.op_args()["softcap"]
        if loss_fn is not None and loss_fn.softcap != softcap:
            # the loss would train the log-probs of other logits than the model samples from
            raise ValueError(f"loss_fn has softcap={loss_fn.softcap}, the model's logits need the fused head's "
                             f"softcap={softcap} (its config's final_logit_softcapping over its logit scale): "
                             "build the loss with logit_transform(model).op_args(temperature)")
        hidden = self.hidden(mb)
        weight, bias = self.transform.rows(head.weight, head.bias)
        if loss_fn is None:
            logp, _ = fused_token_logprobs(hidden, weight, mb.targets, bias=bias,
                                           **self.transform.op_args(temperature), **self.op_kwargs)
            return logp
        return loss_fn(hidden, weight, mb.targets, mb.mask, mb.advantages, bias=bias,
                       old_logp=old_logp, off_policy=mb.off_policy, rewards=mb.rewards, normalizers=normalizers)


def gathered_state_dict(lm: nn.Module, rank: int) -> Optional[dict[str, Tensor]]:
    """The full weights of a ZeRO-3 partitioned model on the CPU of rank 0 (None elsewhere).

    One parameter is gathered at a time, so no rank ever holds the whole model on its device.
    Every rank must call it (the gathers are collective). Tied weights appear under each name,
    as ``state_dict`` gives them; ``save_pretrained`` drops the duplicates.
    """
    out: Optional[dict[str, Tensor]] = {} if rank == 0 else None
    params = dict(lm.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        with zero3.gathered(p):
            if out is not None:
                out[name] = p.detach().to("cpu", copy=True)
    if out is not None:
        persistent = set(lm.state_dict())  # buffers saved with the model (not e.g. RoPE's inv_freq)
        for name, buf in lm.named_buffers():
            if name in persistent:
                out[name] = buf.detach().to("cpu", copy=True)
    return out
