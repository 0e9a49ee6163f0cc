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
