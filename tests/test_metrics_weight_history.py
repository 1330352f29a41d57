"""SampleWeightHistory: per-sample weight records against a plain-Python accumulation of the same batches."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_reweight.metrics import SampleWeightHistory
from lightning_reweight.metrics.weight_history import batch_percentiles


def percentile_by_counting(weights: list[float]) -> list[float]:
    """(rank - 1/2) / B with tied values sharing their mean rank, by counting (the definition, no sorting)."""
    n = len(weights)
    return [(sum(v < w for v in weights) + sum(v == w for v in weights) / 2) / n for w in weights]


def reference(batches: list[tuple[torch.Tensor, torch.Tensor]], num_samples: int) -> dict[str, list[float]]:
    sums = {i: [0.0, 0.0, 0.0, 0.0] for i in range(num_samples)}
    for weights, indices in batches:
        ws = weights.tolist()
        for i, w, p in zip(indices.tolist(), ws, percentile_by_counting(ws)):
            sums[i][0] += 1
            sums[i][1] += p
            sums[i][2] += w
            sums[i][3] += w > 0
    out: dict[str, list[float]] = {"visits": [], "percentile": [], "mean_weight": [], "positive_share": []}
    for i in range(num_samples):
        visits = sums[i][0]
        out["visits"].append(visits)
        for k, key in enumerate(("percentile", "mean_weight", "positive_share"), start=1):
            out[key].append(sums[i][k] / visits if visits else math.nan)
    return out


def random_batches(seed: int, num_samples: int, count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        w = torch.rand(size, generator=g)
        w[torch.rand(size, generator=g) < 0.3] = 0.0  # clipped weights (L2RW): many exact ties at zero
        w[: size // 4] = torch.round(w[: size // 4] * 4) / 4  # and ties among positive ones
        # repeats within a batch, too; the last two samples are never drawn
        out.append((w, torch.randint(0, num_samples - 2, (size,), generator=g)))
    return out


@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_batch_percentiles_match_counting(size):
    g = torch.Generator().manual_seed(size)
    w = torch.round(torch.rand(size, generator=g) * 5) / 5
    expected = torch.tensor(percentile_by_counting(w.tolist()), dtype=torch.float64)
    torch.testing.assert_close(batch_percentiles(w), expected, rtol=0, atol=1e-12)


def test_uniform_weights_are_all_average():
    assert torch.equal(batch_percentiles(torch.full((5,), 0.2)), torch.full((5,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1])
def test_history_matches_python_accumulation(seed):
    batches = random_batches(seed, num_samples=30, count=12, size=9)
    history = SampleWeightHistory(num_samples=30)
    for w, idx in batches:
        history.update(w, idx)
    got = history.compute()
    want = reference(batches, 30)
    assert want["visits"][-1] == 0 and math.isnan(want["percentile"][-1])  # never seen: nan scores
    for key in want:
        torch.testing.assert_close(got[key], torch.tensor(want[key], dtype=torch.float64), equal_nan=True)


def test_states_sum_across_processes_and_checkpoint_round_trip():
    """Two ranks' sums added (the DDP reduction) give the history of all their batches; a restored state too."""
    batches = random_batches(5, num_samples=20, count=8, size=6)
    ranks = [SampleWeightHistory(20), SampleWeightHistory(20)]
    for k, (w, idx) in enumerate(batches):
        ranks[k % 2].update(w, idx)
    assert ranks[0]._reductions["sums"].__name__ == "dim_zero_sum"
    merged = SampleWeightHistory.from_state({"sums": ranks[0].metric_state_cpu()["sums"] + ranks[1].sums})
    want = reference(batches, 20)
    for key in want:
        torch.testing.assert_close(merged.compute()[key], torch.tensor(want[key], dtype=torch.float64), equal_nan=True)


def test_bad_input():
    with pytest.raises(ValueError, match="num_samples"):
        SampleWeightHistory(0)
    history = SampleWeightHistory(4)
    with pytest.raises(ValueError, match="one length"):
        history.update(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        history.update(torch.rand(2), torch.tensor([1, 4]))


def test_nan_weights_show_as_nan_not_as_a_rank():
    """A nan weight (a diverged run) must not pass for the batch's highest weight."""
    assert torch.isnan(batch_percentiles(torch.tensor([0.1, float("nan"), 0.3]))).all()
    history = SampleWeightHistory(num_samples=4)
    history.update(torch.tensor([0.5, float("nan")]), torch.tensor([0, 1]))
    history.update(torch.tensor([0.2, 0.6]), torch.tensor([2, 3]))
    out = history.compute()
    assert torch.isnan(out["percentile"][:2]).all()
    assert math.isnan(float(out["mean_weight"][1])) and math.isnan(float(out["positive_share"][1]))
    assert float(out["mean_weight"][0]) == 0.5 and float(out["positive_share"][0]) == 1.0
    assert out["percentile"][2:].tolist() == [0.25, 0.75]  # (rank - 1/2) / B in a clean batch


def test_float_indices_are_refused_not_truncated():
    with pytest.raises(ValueError, match="integer dataset indices"):
        SampleWeightHistory(4).update(torch.ones(2), torch.tensor([0.7, 2.9]))


@pytest.mark.parametrize("move", ["to_float32", "to_bfloat16", "set_dtype"])
def test_states_stay_float64_through_dtype_moves(move):
    """``.to(torch.float32)`` (and Lightning's bf16-true conversion of a module holding the metric) turned the
    float64 sums into float32, and the next update failed in index_add_ (float vs double)."""
    batches = random_batches(2, num_samples=30, count=6, size=9)
    history = SampleWeightHistory(num_samples=30)
    history.update(*batches[0])
    history = {"to_float32": lambda h: h.to(torch.float32), "to_bfloat16": lambda h: h.to(dtype=torch.bfloat16),
               "set_dtype": lambda h: h.set_dtype(torch.float32)}[move](history)
    for w, idx in batches[1:]:
        history.update(w, idx)
    assert history.sums.dtype == torch.float64
    history.compute()  # cached; a later dtype move must not leave a float32 copy of it behind
    history = history.to(torch.float32)
    got, want = history.compute(), reference(batches, 30)
    assert got["percentile"].dtype == torch.float64
    for key in want:
        torch.testing.assert_close(got[key], torch.tensor(want[key], dtype=torch.float64), equal_nan=True)


def test_a_bf16_true_module_holding_the_history_trains():
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)
            self.history = SampleWeightHistory(32)

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            losses = nn.functional.cross_entropy(self.net(x), y, reduction="none")
            self.history.update(losses.detach(), idx)
            return losses.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)), torch.arange(32))
    module = Module()
    L.Trainer(precision="bf16-true", max_epochs=2, logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).fit(module, DataLoader(data, batch_size=8))
    assert module.history.sums.dtype == torch.float64
    assert module.history.compute()["visits"].tolist() == [2.0] * 32  # every sample, once per epoch
