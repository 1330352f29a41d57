"""The datamodule's loaders: random transforms in loader workers and the training order under DDP (and the
classifier's logged loss there)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def test_training_and_meta_workers_draw_different_random_transforms():
    """With loader workers, the k-th meta sample and the k-th training sample used to get the same random
    augmentation: both loaders' workers were seeded alike."""
    from _toy_random_transform import Toy

    dm = Toy(meta_per_class=20, val_fraction=0.0, batch_size=20, meta_batch_size=20, num_workers=1, seed=3)
    dm.setup()
    train = next(iter(dm.train_dataloader()))[0].flatten()
    meta = next(iter(dm.meta_dataloader()))[0].flatten()
    assert len(set(train.tolist())) == len(train) and len(set(meta.tolist())) == len(meta)  # real draws
    assert not set(train.tolist()) & set(meta.tolist())


def test_workers_behind_a_callbacks_sampler_draw_per_rank_and_leave_the_global_rng():
    """A sampler set on the datamodule (DeferredResampling's) made the loader draw its workers' base seed from the
    global RNG, which seed_everything makes the same on every rank: both ranks drew the same random transforms,
    and the draw moved the training's own random stream."""
    from types import SimpleNamespace

    from _toy_random_transform import Toy
    from torch.utils.data import SequentialSampler

    draws = []
    for rank in (0, 1):
        dm = Toy(meta_per_class=5, val_fraction=0.0, batch_size=20, num_workers=1, seed=3)
        dm.setup()
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0, fit_loop=None,
                                     distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}, overfit_batches=0)
        dm.train_sampler = SequentialSampler(range(40))
        torch.manual_seed(0)  # as seed_everything does on every rank
        before = torch.get_rng_state()
        draws.append(next(iter(dm.train_dataloader()))[0].flatten().tolist())
        assert torch.equal(torch.get_rng_state(), before)
    assert len(set(draws[0])) == 20 and not set(draws[0]) & set(draws[1])


def _run_ddp_script(script, out, env, attempts=2, timeout=150):
    """Run the 2-process script (normally 15-20 s); once more if it hangs.

    One full-suite run out of many hung in a resumed fit with a loader worker (cause not found; suspected: the
    worker forked while the process group's threads ran, a fork-with-threads hazard; not reproduced in 13 runs). A
    hang says nothing about the order this test checks, so a second attempt runs after the whole process group
    (the launched rank and the workers too) is killed; a wrong order still fails.
    """
    import signal

    for attempt in range(attempts):
        proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if attempt == attempts - 1:
                raise


@pytest.mark.ddp
def test_ddp_training_order_follows_the_datamodule_seed_and_ranks_draw_their_own_transforms(tmp_path):
    """Under DDP Lightning's injected DistributedSampler took its seed from seed_everything, so the datamodule's
    ``seed`` no longer set the training order; and with workers both ranks drew the same random transforms."""
    script = Path(__file__).with_name("_ddp_data_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = _run_ddp_script(script, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {name: [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in (0, 1)] for name in "abc"}
    n_train = 80  # 90 pooled, 5 meta per class
    for r0, r1 in runs.values():
        assert len(r0["seen"]) == len(r1["seen"]) == 2
        for e0, e1 in zip(r0["seen"], r1["seen"]):  # each epoch: disjoint halves of the training set
            assert len(e0) == len(e1) == n_train // 2 and sorted(e0 + e1) == list(range(n_train))
        assert r0["seen"][0] != r0["seen"][1]  # reshuffled each epoch
        assert not set(r0["draws"]) & set(r1["draws"])  # each rank's workers draw their own numbers
        assert not set(r0["meta_draws"]) & set(r1["meta_draws"])
        assert not set(r0["draws"]) & set(r0["meta_draws"])
        # ReweightClassifier's train/loss is the epoch mean over both ranks' batches (it was rank 0's own mean)
        last = [(loss, size) for r in (r0, r1) for loss, size in r["losses"][-1]]
        mean = sum(loss * size for loss, size in last) / sum(size for _, size in last)
        assert r0["logged_loss"] == r1["logged_loss"] == pytest.approx(mean, rel=1e-5)
    for rank in (0, 1):  # resumed after epoch 0 with a worker: epochs 1 and 2 as the uninterrupted run's
        straight, resumed = (torch.load(tmp_path / f"{name}_rank{rank}.pt")["seen"] for name in ("straight", "resumed"))
        assert len(straight) == 3 and resumed == straight[1:]
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert [r["seen"] for r in a] == [r["seen"] for r in b]  # another seed_everything: the same order
    assert [r["seen"][0] for r in a] != [r["seen"][0] for r in c]  # another datamodule seed: another order


def test_the_meta_loader_never_ends_an_epoch_with_a_single_sample_batch():
    """20 meta samples in batches of 19 ended every meta epoch with one sample, on which BatchNorm fails in train mode
    mid-fit; a last batch of one is dropped, other partial batches are kept."""
    from _toy_random_transform import Toy

    for meta_batch_size, sizes in ((19, [19]), (7, [7, 7, 6]), (20, [20])):
        dm = Toy(meta_per_class=10, val_fraction=0.0, meta_batch_size=meta_batch_size)
        dm.setup()
        assert [len(b[1]) for b in dm.meta_dataloader()] == sizes


def test_the_training_loader_never_ends_an_epoch_with_a_single_sample_batch():
    """80 training samples in batches of 79 ended every epoch with one sample, on which a BatchNorm model failed in
    train mode mid-fit (a long-tailed split makes any training-set size likely); a last batch of one is dropped, on
    each rank's share under DDP and for a sampler set by a callback too, while other partial batches are kept."""
    from types import SimpleNamespace

    from _toy_random_transform import Toy
    from torch.utils.data import SequentialSampler

    for batch_size, sizes in ((79, [79]), (27, [27, 27, 26]), (80, [80]), (200, [80])):
        dm = Toy(meta_per_class=5, val_fraction=0.0, batch_size=batch_size)
        dm.setup()
        assert len(dm.train_dataset) == 80
        assert [len(b[1]) for b in dm.train_dataloader()] == sizes
        dm.train_sampler = SequentialSampler(range(81 if batch_size == 80 else 80))  # 81: ends on one sample
        assert [len(b[1]) for b in dm.train_dataloader()] == ([80] if batch_size == 80 else sizes)
    for rank in (0, 1):  # two ranks of 40 samples each, in batches of 39: one sample left per rank
        dm = Toy(meta_per_class=5, val_fraction=0.0, batch_size=39)
        dm.setup()
        dm.trainer = SimpleNamespace(world_size=2, distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
                                     overfit_batches=0, global_rank=rank, current_epoch=0, fit_loop=None)
        assert [len(b[1]) for b in dm.train_dataloader()] == [39]
        # a user's sampler, which Lightning shards into ceil(len / 2) per rank: the rule applies to that share
        dm.batch_size = 32
        for total, drop in ((97, False), (66, True), (65, True), (64, False)):  # per rank 49, 33, 33, 32
            dm.train_sampler = SequentialSampler(range(total))
            assert dm.train_dataloader().drop_last is drop, total


def test_the_meta_loader_shuffles_independently_of_the_training_loader():
    """Training and meta sets of the same size: the meta loader must not visit its samples in the training loader's
    order (both shuffles drawn from one stream would give the same permutation)."""
    from lightning_reweight.data import ReweightDataModule
    from lightning_reweight.data.indexed import TensorClassificationDataset

    class Positions(ReweightDataModule):  # the input of a pool sample is its position in the pool
        num_classes = 2

        def load_train_pool(self):
            y = torch.arange(2).repeat(40)
            return TensorClassificationDataset(torch.arange(80.0).view(80, 1), y), y

        def load_test_set(self):
            return TensorClassificationDataset(torch.zeros(2, 1), torch.arange(2))

    for seed in range(3):
        dm = Positions(meta_per_class=20, val_fraction=0.0, batch_size=40, meta_batch_size=40, seed=seed)
        dm.setup()
        assert len(dm.meta_dataset) == len(dm.train_dataset) == 40
        orders = []
        for loader in (dm.train_dataloader(), dm.meta_dataloader()):
            positions = [int(x) for batch in loader for x in batch[0].flatten()]
            orders.append([sorted(positions).index(p) for p in positions])  # the order within the set
        assert sorted(orders[0]) == sorted(orders[1]) == list(range(40))
        assert orders[0] != orders[1]
