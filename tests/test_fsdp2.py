"""hpt_fast.fsdp2: the fused op on a head FSDP2 shards as a unit of its own, on a one-rank group
(two ranks, with the reduction: test_causal_lm_loss's sharded training step)."""
import copy

import pytest
import torch
from torch import nn

from hpt_fast import FusedUnifiedLoss, fsdp2, fused_linear_loss, fused_token_logprobs


def _loss(head: nn.Module, targets: torch.Tensor, kind: str):
    """A loss of hidden [B, T, H] from ``head``'s weight as it is when called: the op's summed
    loss in mode A or B, or (README's example) GRPO's (loss, stats) from ``FusedUnifiedLoss``."""
    if kind == "B":
        return lambda hidden: fused_linear_loss(hidden, head.weight, targets, lambda lp, ent, rows: -lp - 0.1 * ent,
                                                with_entropy=True)[0]
    if kind == "A":
        return lambda hidden: sum(x.sum() for x in fused_token_logprobs(hidden, head.weight, targets,
                                                                        return_entropy=True))
    advantages = torch.tensor([1.0, -0.5, 0.3])
    return lambda hidden: FusedUnifiedLoss("grpo")(hidden, head.weight, targets, targets != -100, advantages)


@pytest.mark.parametrize("kind", ["A", "B", "FusedUnifiedLoss"])
def test_the_op_as_a_head_units_forward_gets_the_unsharded_head_and_reduces_its_gradient(one_rank_group, kind):
    """Run as the head's forward, the op reads the unsharded weight and the head's gradient
    reaches its sharded parameter: loss and gradients equal the op's on an unsharded copy.
    Outside that forward the op refuses the sharded weight (a DTensor)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    head = nn.Linear(16, 37, bias=False)
    plain = copy.deepcopy(head)
    fully_shard(head, mesh=init_device_mesh("cpu", (1,)))
    assert fsdp2.is_unit(head) and not fsdp2.is_unit(plain)
    hidden = torch.randn(3, 3, 16, requires_grad=True)
    targets = torch.randint(0, 37, (3, 3))
    targets[1, 2] = -100
    got = fsdp2.as_forward(head, _loss(head, targets, kind), hidden)
    assert "forward" not in vars(head)
    plain_hidden = hidden.detach().clone().requires_grad_()
    want = _loss(plain, targets, kind)(plain_hidden)
    if kind == "FusedUnifiedLoss":
        (got, stats), (want, want_stats) = got, want
        assert stats.keys() == want_stats.keys()
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(hidden.grad, plain_hidden.grad)
    torch.testing.assert_close(head.weight.grad.full_tensor(), plain.weight.grad)
    with pytest.raises(TypeError, match="weight is a DTensor"):
        _loss(head, targets, kind)(hidden)
