"""The rank pool turns a failing, hanging or dying rank into a clear error, and recovers."""
import time

import pytest
from rankjobs import misbehave

from spbench.common.pool import RankError, RankPool


@pytest.mark.parametrize("how,match", [("raise", "(?s)failed in misbehave:.*--- rank 1:.*rank 1 broke on purpose"),
                                       ("hang", "timed out after 5 s"),
                                       ("die", "rank 1 died")])
def test_bad_rank_ends_the_job_with_a_clear_error_and_pool_recovers(how, match):
    with RankPool(2, timeout=5) as pool:
        t0 = time.monotonic()
        with pytest.raises(RankError, match=match) as err:
            pool.run(misbehave, how)
        assert time.monotonic() - t0 < 60
        assert "Traceback" in str(err.value) or how != "raise"
        assert pool.run(misbehave, "ok", timeout=120) == [0, 1]  # a fresh set of ranks serves the next job
