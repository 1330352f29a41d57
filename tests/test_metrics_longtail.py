import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_reweight.metrics import BalancedAccuracy, PerClassAccuracy, ShotAccuracy


def reference(preds, target, num_classes):
    """Per-class accuracy by plain counting."""
    correct = [0] * num_classes
    total = [0] * num_classes
    for p, t in zip(preds.tolist(), target.tolist()):
        total[t] += 1
        correct[t] += int(p == t)
    return [c / n if n else math.nan for c, n in zip(correct, total)]


def data(seed=0, n=300, c=6):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    target[target == 5] = 4  # class 5 never appears
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), target] += torch.rand(n, generator=g) * 2  # better than chance, not perfect
    return logits, target


def test_against_reference():
    logits, target = data()
    ref = reference(logits.argmax(1), target, 6)
    per = PerClassAccuracy(6)
    per.update(logits, target)
    got = per.compute()
    assert math.isnan(float(got[5]))
    assert torch.allclose(got[:5], torch.tensor(ref[:5]))
    bal = BalancedAccuracy(6)
    bal.update(logits, target)
    assert float(bal.compute()) == pytest.approx(sum(ref[:5]) / 5, rel=1e-6)
    # many (> 100): 0,1  medium (20..100, both ends included): 2,3  few (< 20): 4,5 (5 absent from the data)
    counts = [500, 101, 100, 20, 19, 3]
    shot = ShotAccuracy(counts)
    shot.update(logits, target)
    out = shot.compute()
    assert float(out["many"]) == pytest.approx((ref[0] + ref[1]) / 2, rel=1e-6)
    assert float(out["medium"]) == pytest.approx((ref[2] + ref[3]) / 2, rel=1e-6)
    assert float(out["few"]) == pytest.approx(ref[4], rel=1e-6)


def test_thresholds_configurable():
    logits, target = data(1)
    ref = reference(logits.argmax(1), target, 6)
    shot = ShotAccuracy([500, 150, 60, 20, 19, 3], many_threshold=200, few_threshold=100)
    shot.update(logits, target)
    out = shot.compute()
    assert float(out["many"]) == pytest.approx(ref[0], rel=1e-6)
    assert float(out["medium"]) == pytest.approx(ref[1], rel=1e-6)
    assert float(out["few"]) == pytest.approx(sum(ref[2:5]) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="cls_num_list"):
        ShotAccuracy([10, 0])


def test_split_and_merge_equals_whole():
    logits, target = data(2)
    for cls, args in ((BalancedAccuracy, (6,)), (PerClassAccuracy, (6,))):
        whole, a, b = cls(*args), cls(*args), cls(*args)
        whole.update(logits, target)
        a.update(logits[:170], target[:170])
        b.update(logits[170:], target[170:])
        a.merge_state(b)
        assert torch.allclose(a.compute(), whole.compute(), equal_nan=True)


def _ddp_worker(rank, world, path, out):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    logits, target = data(3)
    idx = torch.arange(rank, target.numel(), world)  # interleaved shards of different content
    m = ShotAccuracy([500, 150, 60, 20, 19, 3])
    b = BalancedAccuracy(6)
    m.update(logits[idx], target[idx])
    b.update(logits[idx], target[idx])
    res = {k: float(v) for k, v in m.compute().items()}
    res["balanced"] = float(b.compute())
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_gloo_two_processes(tmp_path):
    out = str(tmp_path / "res")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True, start_method="fork")
    logits, target = data(3)
    ref = reference(logits.argmax(1), target, 6)
    for rank in range(2):
        res = torch.load(f"{out}.{rank}")
        assert res["many"] == pytest.approx((ref[0] + ref[1]) / 2, rel=1e-6)
        assert res["few"] == pytest.approx(ref[4], rel=1e-6)
        assert res["balanced"] == pytest.approx(sum(ref[:5]) / 5, rel=1e-6)


def test_label_columns_are_refused_not_read_as_scores():
    """Predicted labels of shape (B, 1) would argmax to class 0 everywhere: an error, not a wrong accuracy."""
    target = torch.tensor([0, 1, 2, 1])
    metric = BalancedAccuracy(num_classes=3)
    with pytest.raises(ValueError, match=r"scores of shape \(B, num_classes=3\)"):
        metric.update(target.view(-1, 1), target)
    with pytest.raises(ValueError, match=r"target must be labels of shape \(B,\)"):
        metric.update(target, target.view(-1, 1))
    metric.update(target, target)  # labels (B,) still work: balanced accuracy 1
    assert float(metric.compute()) == 1.0


def test_float_label_vectors_are_refused_not_truncated():
    """Probabilities of shape (B,) would be cast to 0; they are an error (float targets too)."""
    metric = BalancedAccuracy(num_classes=2)
    with pytest.raises(ValueError, match="target must be integer class labels"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0.9, 1.7]))
    with pytest.raises(ValueError, match="integer class labels"):
        metric.update(torch.tensor([0.9, 0.2, 0.8]), torch.tensor([1, 0, 1]))
