"""A datamodule with a known noise mask whose loader, like one that saves its position, resumes mid-epoch."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class ResumableOrder(torch.utils.data.Sampler):
    """A fixed order that, like a loader that saves its position, starts after the batches the epoch has done."""

    def __init__(self, n, batch_size):
        self.n, self.batch_size, self.trainer = n, batch_size, None

    def __iter__(self):
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed if self.trainer else 0
        return iter(range(done * self.batch_size, self.n))

    def __len__(self):
        return self.n


class MaskedData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = 240
        y = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        self.noise_mask = torch.rand(n, generator=g) < 0.4
        self.noisy = torch.where(self.noise_mask, (y + 1) % 4, y)
        self.meta = TensorDataset(self.x[:60], y[:60])
        self.sampler = ResumableOrder(n, 40)

    def train_dataloader(self):
        self.sampler.trainer = self.trainer
        return DataLoader(TensorDataset(self.x, self.noisy, torch.arange(240)), batch_size=40, sampler=self.sampler)

    def meta_dataloader(self):
        return DataLoader(self.meta, batch_size=30, shuffle=True)
