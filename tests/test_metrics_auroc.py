"""WeightNoiseAUROC against scikit-learn and the pairwise definition; DDP gathering."""

from __future__ import annotations

import pytest
import torch

from lightning_reweight.metrics import WeightNoiseAUROC, rank_auroc


def pairwise_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), by enumerating every pair."""
    p, n = scores[positive], scores[~positive]
    diff = p.view(-1, 1) - n.view(1, -1)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_and_pairwise_with_ties(seed):
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(300, generator=g) < 0.4
    weights = torch.rand(300, generator=g) + (~noisy).float() * 0.3
    weights[:50] = torch.round(weights[:50] * 4) / 4  # ties
    metric = WeightNoiseAUROC()
    for chunk in range(0, 300, 70):
        metric.update(weights[chunk : chunk + 70], noisy[chunk : chunk + 70])
    got = float(metric.compute())
    assert got == pytest.approx(sklearn.roc_auc_score((~noisy).numpy(), weights.numpy()), abs=1e-12)
    assert got == pytest.approx(pairwise_auroc(weights, ~noisy), abs=1e-12)


def test_large_weights_do_not_saturate_and_orientation():
    noisy = torch.tensor([True, True, False, False])
    assert float(rank_auroc(torch.tensor([100.0, 101.0, 102.0, 103.0]), ~noisy)) == 1.0
    metric = WeightNoiseAUROC()
    metric.update(torch.tensor([2.0, 3.0, 0.0, 1.0]), noisy)  # noisy samples weighted higher
    assert float(metric.compute()) == 0.0


def test_single_class_is_nan():
    metric = WeightNoiseAUROC()
    metric.update(torch.rand(5), torch.zeros(5, dtype=torch.bool))
    assert torch.isnan(metric.compute())


def test_states_concatenate_across_processes():
    """The DDP reduction of the states (cat) gives the AUROC of the union of the ranks' samples."""
    g = torch.Generator().manual_seed(3)
    noisy = torch.rand(200, generator=g) < 0.5
    weights = torch.rand(200, generator=g) + (~noisy).float() * 0.2
    ranks = [WeightNoiseAUROC(), WeightNoiseAUROC()]
    ranks[0].update(weights[:100], noisy[:100])
    ranks[1].update(weights[100:], noisy[100:])
    assert ranks[0]._reductions["weights"].__name__ == "dim_zero_cat"
    merged = WeightNoiseAUROC()
    merged.weights = [torch.cat([r.weights[0] for r in ranks])]
    merged.noisy = [torch.cat([r.noisy[0] for r in ranks])]
    assert float(merged.compute()) == pytest.approx(pairwise_auroc(weights, ~noisy), abs=1e-12)


def test_float64_weights_keep_their_order():
    """Weights that differ only beyond float32's precision are not ties (the pairwise definition in float64)."""
    base = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    weights = base + torch.tensor([1e-12, 2e-12, 0.0, 3e-12], dtype=torch.float64)
    noisy = torch.tensor([False, False, True, True])
    metric = WeightNoiseAUROC()
    metric.update(weights, noisy)
    assert float(metric.compute()) == pytest.approx(pairwise_auroc(weights, ~noisy))
    metric = WeightNoiseAUROC()
    metric.update(weights[[0, 1, 2]], noisy[[0, 1, 2]])
    assert float(metric.compute()) == 1.0  # float32 would tie all three: 0.5



def test_a_dtype_move_keeps_the_stored_weights_float64():
    """``.to(torch.float32)`` (Lightning's bf16-true / 16-true conversion of a module holding the metric) rounded the
    stored float64 weights, tying weights that differ only beyond float32's precision."""
    weights = 1.0 + torch.tensor([1e-12, 2e-12, 0.0], dtype=torch.float64)
    noisy = torch.tensor([False, False, True])
    metric = WeightNoiseAUROC()
    metric.update(weights, noisy)
    metric = metric.to(torch.float32)
    assert float(metric.compute()) == pytest.approx(pairwise_auroc(weights, ~noisy)) == 1.0

def test_nan_weight_gives_nan_and_empty_metric_gives_nan():
    metric = WeightNoiseAUROC()
    assert torch.isnan(metric.compute())  # nothing seen: nan, not an error
    metric.update(torch.tensor([float("nan"), 0.2, 0.9, 0.1]), torch.tensor([True, True, False, False]))
    assert torch.isnan(metric.compute())  # a nan weight is not the highest weight
    assert torch.isnan(rank_auroc(torch.tensor([0.1, float("nan")]), torch.tensor([True, False])))


def _ddp_worker(rank, world, path, out, case):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    weights, noisy = _shards()
    metric = WeightNoiseAUROC()
    if case == "both" or rank == 0:
        metric.update(weights[rank], noisy[rank])
    torch.save(float(metric.compute()), f"{out}.{rank}")
    dist.destroy_process_group()


def _shards():
    g = torch.Generator().manual_seed(5)
    noisy = torch.rand(70, generator=g) < 0.4
    weights = torch.rand(70, generator=g) + (~noisy).float() * 0.3
    return (weights[:40], weights[40:]), (noisy[:40], noisy[40:])  # shards of different sizes


@pytest.mark.ddp
@pytest.mark.parametrize("case", ["both", "rank0_only"])
def test_ddp_sync_gives_the_auroc_of_all_ranks_samples(tmp_path, case):
    """A real 2-process gloo sync (compute() used to fail on the synced tensor state, and gloo aborted when a rank
    had no sample: its empty placeholder had another dtype)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), out, case), nprocs=2, join=True,
                       start_method="fork")
    weights, noisy = _shards()
    if case == "both":
        expected = pairwise_auroc(torch.cat(weights), ~torch.cat(noisy))
    else:
        expected = pairwise_auroc(weights[0], ~noisy[0])
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == pytest.approx(expected, abs=1e-12)
