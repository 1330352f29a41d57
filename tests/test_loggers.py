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


@pytest.mark.parametrize("prefix", ["", "run1"])
def test_the_epoch_axis_follows_the_wandb_loggers_prefix(prefix):
    """WandbLogger(prefix="run1") writes "run1-epoch" and "run1-memorization/zeta": the axis was defined for the
    unprefixed names, so the charts silently stayed on the global step."""
    from lightning.pytorch.loggers import WandbLogger

    from lightning_reweight.loggers import define_epoch_axis

    defined = []

    class FakeWandb(WandbLogger):
        def __init__(self) -> None:
            self._prefix = prefix

        @property
        def experiment(self):
            def define_metric(name, step_metric=None):
                defined.append((name, step_metric))

            return types.SimpleNamespace(define_metric=define_metric)

    define_epoch_axis(_trainer(FakeWandb()), ["memorization/zeta", "memorization/drop"])
    # the names WandbLogger.log_metrics actually writes; exact names (a pattern lost at random to WandbLogger's
    # own "*" -> trainer/global_step)
    written = set(_written_names(prefix, ["epoch", "memorization/zeta", "memorization/drop"]))
    epoch_name = next(n for n in written if n.endswith("epoch"))
    assert defined[0] == (epoch_name, None)
    assert {name for name, _ in defined[1:]} == written - {epoch_name}
    assert all(axis == epoch_name for _, axis in defined[1:])


def _written_names(prefix, keys):
    from lightning.fabric.utilities.logger import _add_prefix
    from lightning.pytorch.loggers import WandbLogger

    return _add_prefix(dict.fromkeys(keys, 0.0), prefix, WandbLogger.LOGGER_JOIN_CHAR)


def test_step_helpers_at_the_edges():
    """log_every_n_steps=0 writes no step logs (it divided by zero); before any step the epoch-end step is 0, not -1;
    with several optimizers the step axis is Lightning's count of batches that stepped, not global_step."""
    from lightning_reweight.loggers import epoch_end_step, log_step, step_logs_written

    assert step_logs_written(types.SimpleNamespace(log_every_n_steps=0, global_step=3)) is False
    assert [step_logs_written(types.SimpleNamespace(log_every_n_steps=4, global_step=s)) for s in range(8)] == [
        (s + 1) % 4 == 0 for s in range(8)]
    assert epoch_end_step(types.SimpleNamespace(global_step=0)) == 0
    two_optimizers = types.SimpleNamespace(
        global_step=10, fit_loop=types.SimpleNamespace(epoch_loop=types.SimpleNamespace(_batches_that_stepped=5)))
    assert log_step(two_optimizers) == 5 and epoch_end_step(two_optimizers) == 4


def _fake_tensorboard(add_figure):
    """A TensorBoardLogger whose experiment only takes figures, handing them to ``add_figure``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    class FakeTensorBoard(TensorBoardLogger):  # only the experiment is used
        def __init__(self) -> None:
            pass

        @property
        def experiment(self):
            return types.SimpleNamespace(add_figure=add_figure)

    return FakeTensorBoard()


def test_the_weighting_function_figure_plots_v_of_l_over_the_requested_losses():
    """The figure's curve is (l, V(l)) for ``points`` losses evenly spaced over [0, max_loss]."""
    pytest.importorskip("matplotlib")
    from lightning_reweight.callbacks._plots import log_weight_function
    from lightning_reweight.meta import MetaWeightNet

    figures = []
    torch.manual_seed(0)
    mwn = MetaWeightNet(hidden=6)
    logger = _fake_tensorboard(lambda tag, fig, global_step, close: figures.append(fig))
    assert log_weight_function(_trainer(logger), mwn, max_loss=2.5, points=11)
    (line,) = figures[0].axes[0].get_lines()
    losses = [0.25 * k for k in range(11)]
    assert line.get_xdata().tolist() == pytest.approx(losses)
    net = mwn.weight_net.net  # V(l) = sigmoid(w2 . relu(w1 l + b1) + b2), written out
    with torch.no_grad():
        expected = [float(torch.sigmoid(net[2].weight @ torch.relu(net[0].weight[:, 0] * loss + net[0].bias)
                                         + net[2].bias)) for loss in losses]
    assert line.get_ydata().tolist() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- from the fourth mutation audit
class _RecordingLogger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((dict(metrics), step))


def test_publish_metrics_writes_on_rank_zero_only_and_nothing_for_no_values():
    """Every rank puts the values into callback_metrics (ModelCheckpoint reads them on each rank), only rank zero
    writes them to the loggers, with the epoch beside them; no values means no row at all (not an epoch-only row)."""
    from lightning_reweight.loggers import publish_metrics

    for rank_zero in (True, False):
        logger = _RecordingLogger()
        trainer = types.SimpleNamespace(loggers=[logger], is_global_zero=rank_zero, callback_metrics={})
        publish_metrics(trainer, {"a/b": 0.5}, epoch=2, step=17)
        publish_metrics(trainer, {}, epoch=3, step=23)
        assert {k: float(v) for k, v in trainer.callback_metrics.items()} == {"a/b": 0.5}
        assert logger.rows == ([({"a/b": 0.5, "epoch": 2}, 17)] if rank_zero else [])


def test_the_weighting_function_figure_takes_the_given_epoch_and_step():
    """A figure drawn for an epoch closed at a resume's train start carries that epoch in its title and goes at the
    given step, not at the trainer's current epoch and epoch-end step; without them it takes the trainer's."""
    pytest.importorskip("matplotlib")
    from lightning_reweight.callbacks._plots import log_weight_function
    from lightning_reweight.meta import MetaWeightNet

    drawn = []
    logger = _fake_tensorboard(
        lambda tag, fig, global_step, close: drawn.append((fig.axes[0].get_title(), global_step)))
    trainer = types.SimpleNamespace(loggers=[logger], current_epoch=4, global_step=30, is_global_zero=True)
    assert log_weight_function(trainer, MetaWeightNet(hidden=4), epoch=3, step=23)
    assert log_weight_function(trainer, MetaWeightNet(hidden=4))
    assert drawn == [("weighting function, epoch 3", 23), ("weighting function, epoch 4", 29)]
