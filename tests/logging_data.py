"""A tiny datamodule with a known noise mask and a fixed weighting, shared by the logger integration tests."""

import lightning as L
import torch


class NoisyBlobs(L.LightningDataModule):
    """64 random 5-d inputs in 3 classes; even indices are "noisy"; batches of 16 carry indices."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = 64
        self.num_classes = 3
        y = torch.randint(3, (n,), generator=g)
        self.noise_mask = torch.arange(n) % 2 == 0
        self.train_dataset = torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g), y, torch.arange(n))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=16, shuffle=True)


class ParityWeights:
    """Weight 1 for even (noisy) indices, 2 for odd (clean) ones."""

    def sample_weights(self, losses, context):
        return 1.0 + (context.indices % 2).float()
