import pytest
import torch

from runtime.comm import RingComm, RingCommError


def test_ring_comm_raises_on_misuse():
    comm = RingComm(None)
    comm.send_recv(torch.zeros(2))
    with pytest.raises(RingCommError, match="wait before commit"):
        comm.wait()
    comm.commit()
    with pytest.raises(RingCommError, match="commit called twice"):
        comm.commit()
    with pytest.raises(RingCommError, match="send_recv after commit"):
        comm.send_recv(torch.zeros(2))
    comm.wait()
    comm.commit()  # a fresh round after wait is fine
    comm.wait()


def test_gather_and_scatter_are_exact_and_raise_no_deprecation_warning(pools):
    from rankjobs import gather_and_scatter_warning_free

    (g0, r0), (g1, r1) = pools(2).run(gather_and_scatter_warning_free)
    x0, x1 = torch.arange(3.0, dtype=torch.float64), torch.arange(3.0, dtype=torch.float64) + 10
    assert torch.equal(g0, torch.stack([x0, x1])) and torch.equal(g1, g0)
    assert torch.equal(r0, x0 + x1) and torch.equal(r1, 2 * (x0 + x1))
