"""The dispatcher-level counter the step-cost guards and the GPU benchmark rely on."""

import torch

from zip2zip_hf.evaluation.op_counts import count_ops


def test_kernels_are_counted_and_views_are_free():
    x = torch.arange(12.0)
    with count_ops() as counts:
        y = x.view(3, 4).t()[1:]  # views only
        z = y * 2 + 1  # two kernels
    assert counts.kernels == 2 and counts.host_syncs == 0
    assert counts.kernels_by_op == {"aten.mul": 1, "aten.add": 1}
    assert z.shape == (3, 3)


def test_every_kind_of_host_sync_is_counted_by_name():
    x = torch.arange(6)
    with count_ops() as counts:
        int(x[2])
        if x.any():
            x.nonzero()
        x.tolist()
        torch.tensor([1, 2, 3])
        x[:1] = 5  # a scalar fill: no copy from the host
    assert counts.syncs_by_op == {
        "aten._local_scalar_dense": 2,
        "aten.nonzero": 1,
        "Tensor.tolist": 1,
        "torch.tensor(data)": 1,
    }
    assert counts.host_syncs == 5
    assert torch.Tensor.tolist(x) == [5, 1, 2, 3, 4, 5]  # the counting patch is gone afterwards
