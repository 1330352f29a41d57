"""A ReweightClassifier under manual optimization with two optimizers (features, head), for the callbacks' tests."""

import torch

from lightning_reweight import ReweightClassifier


class TwoOptimizers(ReweightClassifier):
    """Manual optimization with one SGD for the backbone's features and one for its classifier head."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def configure_optimizers(self):
        return [torch.optim.SGD(self.backbone.features.parameters(), lr=0.1),
                torch.optim.SGD(self.backbone.classifier.parameters(), lr=0.1)]

    def training_step(self, batch, batch_idx):
        loss = self.reweight(self.per_sample_loss(batch), batch)
        self.log("train_loss", loss)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
