"""The logging helpers: histograms and figures for W&B and TensorBoard."""

import types

import pytest
import torch

from lightning_reweight.loggers import log_histograms


def _trainer(logger):
    return types.SimpleNamespace(loggers=[logger], current_epoch=0, global_step=3, is_global_zero=True)


def test_non_finite_samples_are_left_out_of_histograms_instead_of_ending_the_run():
    """wandb.Histogram (numpy's histogram) raised on a nan or inf sample, so one diverged weight ended the fit at
    the epoch's end; float64 samples beyond float32's range became inf the same way."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    logged = {}

    class FakeWandb(WandbLogger):  # only log_metrics is used
        def __init__(self) -> None:
            pass

        def log_metrics(self, metrics, step=None):
            logged.update({f"wandb/{k}": v for k, v in metrics.items()})

    class FakeTensorBoard(TensorBoardLogger):  # only the experiment is used
        def __init__(self) -> None:
            pass

        @property
        def experiment(self):
            return types.SimpleNamespace(add_histogram=lambda tag, v, global_step: logged.update({f"tb/{tag}": v}))

    w = torch.tensor([0.5, float("nan"), 1e300, float("inf"), -2.0], dtype=torch.float64)
    finite = [0.5, 1e300, -2.0]
    for logger in (FakeWandb(), FakeTensorBoard()):
        with pytest.warns(UserWarning, match="'w': non-finite"):
            assert log_histograms(_trainer(logger), {"w": w, "all_bad": torch.full((3,), float("nan"))}) == 1
    assert sorted(logged) == ["tb/w", "wandb/w"]  # the all-nan one is skipped like an empty one
    assert torch.as_tensor(logged["tb/w"]).tolist() == finite
    histogram = logged["wandb/w"]
    assert sum(histogram.histogram) == len(finite)
    assert histogram.bins[0] == -2.0 and histogram.bins[-1] == pytest.approx(1e300)


def test_the_weighting_function_figure_leaves_the_users_matplotlib_backend_alone():
    """log_weight_function called matplotlib.use("Agg") every epoch: in a notebook that switched off inline
    figures for the rest of the session."""
    matplotlib = pytest.importorskip("matplotlib")
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from lightning_reweight.callbacks._plots import log_weight_function
    from lightning_reweight.meta import MetaWeightNet

    logged = {}

    class FakeWandb(WandbLogger):
        def __init__(self) -> None:
            pass

        def log_metrics(self, metrics, step=None):
            logged.update(metrics)

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        mwn = MetaWeightNet(hidden=4)
        assert log_weight_function(_trainer(FakeWandb()), mwn, max_loss=2.0, points=5)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    image = logged["meta/weight_function"]
    assert image.image.size[0] > 0  # the figure rendered into an image
