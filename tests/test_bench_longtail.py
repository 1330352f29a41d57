from types import SimpleNamespace

import pytest

from lightning_reweight.bench import METHODS, SCENARIOS, BuildContext
from lightning_reweight.callbacks import DeferredReweighting
from lightning_reweight.losses import LDAMLoss, LogitAdjustedLoss


def ctx(epochs=60):
    dm = SimpleNamespace(train_class_counts=[120, 60, 30, 15, 8, 4, 2, 2, 2, 2])
    recipe = SimpleNamespace(epochs=epochs)
    return BuildContext(scenario=SCENARIOS["digits-lt50"], recipe=recipe, datamodule=dm, seed=0)


@pytest.mark.parametrize("name", ["ce-drw", "ldam", "ldam-drw", "logit-adj"])
def test_registered_for_longtail_only(name):
    assert METHODS[name].tags == frozenset({"longtail"})


def test_parts():
    ce_drw = METHODS["ce-drw"].build(ctx())
    assert ce_drw.criterion is None and not ce_drw.normalized_head
    (drw,) = ce_drw.callbacks
    assert isinstance(drw, DeferredReweighting) and drw.start_epoch == 48  # 0.8 * 60, as 160/200 in the paper
    ldam = METHODS["ldam"].build(ctx())
    assert isinstance(ldam.criterion, LDAMLoss) and ldam.normalized_head and ldam.callbacks == []
    assert ldam.criterion.reduction == "none" and ldam.criterion.s == 30.0
    ldam_drw = METHODS["ldam-drw"].build(ctx(epochs=30))
    assert ldam_drw.normalized_head and ldam_drw.callbacks[0].start_epoch == 24
    la = METHODS["logit-adj"].build(ctx())
    assert isinstance(la.criterion, LogitAdjustedLoss) and not la.normalized_head
