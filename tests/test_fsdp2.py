"""hpt_fast.fsdp2: the fused op on a head FSDP2 shards as a unit of its own, on a one-rank group
(two ranks, with the reduction: test_causal_lm_loss's sharded training step)."""
import copy

import pytest
import torch
from torch import nn

from hpt_fast import fsdp2, fused_linear_loss, fused_token_logprobs


def _loss(head: nn.Module, targets: torch.Tensor, mode: str):
    """The op's summed loss on ``head``'s weight as it is when called, of hidden [N, H]."""
    if mode == "B":
        return lambda hidden: fused_linear_loss(hidden, head.weight, targets, lambda lp, ent, rows: -lp - 0.1 * ent,
                                                with_entropy=True)[0]
    return lambda hidden: sum(x.sum() for x in fused_token_logprobs(hidden, head.weight, targets,
                                                                    return_entropy=True))


@pytest.mark.parametrize("mode", ["A", "B"])
def test_the_op_as_a_head_units_forward_gets_the_unsharded_head_and_reduces_its_gradient(one_rank_group, mode):
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
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 37, (9,))
    targets[2] = -100
    loss = fsdp2.as_forward(head, _loss(head, targets, mode), hidden)
    loss.backward()
    assert "forward" not in vars(head)
    plain_hidden = hidden.detach().clone().requires_grad_()
    want = _loss(plain, targets, mode)(plain_hidden)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(hidden.grad, plain_hidden.grad)
    torch.testing.assert_close(head.weight.grad.full_tensor(), plain.weight.grad)
    with pytest.raises(TypeError, match="weight is a DTensor"):
        _loss(head, targets, mode)(hidden)
