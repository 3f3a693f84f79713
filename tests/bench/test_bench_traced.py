"""The TorchScript form of the folded model (bench/traced.py) keeps the model's exactness."""

from __future__ import annotations

import pytest
import torch

from bench.model_throughput import perturb_zero_convs
from bench.traced import TracedGlow
from model.glow import Glow, GlowConfig
from model.inference import FoldedGlow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the figures do not matter here, and two threads on busy cores crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(one_thread: None) -> Glow:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        glow = Glow(GlowConfig(levels=2, steps_per_level=2, hidden_channels=16))
    perturb_zero_convs(glow, 0.05, seed=0)
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    glow.initialize(x, generator=torch.Generator().manual_seed(2))
    return glow.eval()


def test_log_likelihood_within_1e4_and_round_trip_exact(model: Glow) -> None:
    fast = TracedGlow(FoldedGlow(model, channels_last=True))
    x = torch.randint(0, 256, (9, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for batch in (1, 9):  # traced at batch 8: other batch sizes too
            reference = model.log_prob(x[:batch]).double()
            for _ in range(2):
                values = fast.log_prob(x[:batch]).double()
                assert ((values - reference).abs() / reference.abs()).max() <= 1e-4
            assert torch.equal(fast.decode(fast.encode(x[:batch])), x[:batch])
            torch.testing.assert_close(fast.encode(x[:batch]), model.encode(x[:batch]), rtol=1e-4, atol=1e-4)
