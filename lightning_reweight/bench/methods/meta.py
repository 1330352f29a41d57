"""Meta-gradient methods: Learning to Reweight and Meta-Weight-Net, one row per hypergradient route."""

from __future__ import annotations

from typing import Literal, cast

from lightning_reweight.bench.methods import BuildContext, MethodParts, register_method
from lightning_reweight.callbacks.meta_reweight import MetaReweight
from lightning_reweight.meta import L2RW, MetaWeightNet
from lightning_reweight.meta.engine import Hypergrad

_ROUTES: dict[str, Hypergrad] = {"fd": "finite_diff", "fwd": "forward", "2nd": "second_order"}

#: method-specific settings on top of the shared recipe. MW-Net uses sum-normalised weights with the meta optimizer
#: that goes with them in the official code (the WRN-28-10 script: SGD, momentum 0.9, Nesterov, weight decay 5e-4).
#: Unnormalised, the meta gradient mostly scales every weight up and V learned an increasing function of the loss on
#: digits-sym40 (weight AUROC 0.05, test accuracy below CE); normalised with Adam (the ResNet-32 script's optimizer),
#: Adam's unit-size steps on a meta gradient that has become tiny let V drift late in training, once to an
#: increasing function (weight AUROC 0.11 at the last epoch, digits-sym40 seed 2). Meta lr 1e-2, 10x the official
#: 1e-3, chosen from 1e-3/1e-2/1e-1/1 on seeds 0-2 of digits-sym40/60 (test accuracy 88.4/92.0/85.1/87.4 and
#: 72.9/80.3/74.5/57.8 %; benchmarks/mwn_meta_optimizer.py); see docs/methods/meta_weight_net.md. MW-Net starts
#: after 5 epochs of plain training (chosen from warm-up 0/5/10 on seeds 0-2 of digits-sym40/60 with the Adam
#: setting; the paper has no warm-up).
L2RW_SETTINGS: dict[str, float | int] = {"warmup_epochs": 0}
MWN_SETTINGS: dict[str, float | int | str] = {
    "warmup_epochs": 5,
    "meta_optimizer": "sgd",
    "meta_lr": 1e-2,
    "meta_momentum": 0.9,
    "nesterov": 1,
    "meta_weight_decay": 5e-4,
    "normalize": 1,
}


def _l2rw(hypergrad: Hypergrad):
    def build(ctx: BuildContext) -> MethodParts:
        return MethodParts(callbacks=[MetaReweight(L2RW(), hypergrad=hypergrad, meta_seed=ctx.seed,
                                                   warmup_epochs=int(L2RW_SETTINGS["warmup_epochs"]))])

    return build


def _mwn(hypergrad: Hypergrad, lookahead: bool = True, delayed: bool = False):
    def build(ctx: BuildContext) -> MethodParts:
        strategy = MetaWeightNet(
            lookahead=lookahead,
            delayed=delayed,
            meta_optimizer=cast(Literal["adam", "sgd"], str(MWN_SETTINGS["meta_optimizer"])),  # MetaWeightNet checks it
            meta_lr=float(MWN_SETTINGS["meta_lr"]),
            meta_momentum=float(MWN_SETTINGS["meta_momentum"]),
            nesterov=bool(MWN_SETTINGS["nesterov"]),
            meta_weight_decay=float(MWN_SETTINGS["meta_weight_decay"]),
            normalize=bool(MWN_SETTINGS["normalize"]),
        )
        return MethodParts(callbacks=[MetaReweight(strategy, hypergrad=hypergrad, meta_seed=ctx.seed,
                                                   warmup_epochs=int(MWN_SETTINGS["warmup_epochs"]))])

    return build


for _short, _route in _ROUTES.items():
    register_method(f"l2rw-{_short}", {"noise", "longtail"}, f"Learning to Reweight, {_route} hypergradient")(
        _l2rw(_route)
    )
    register_method(f"mwn-{_short}", {"noise", "longtail"}, f"Meta-Weight-Net, {_route} hypergradient")(
        _mwn(_route)
    )
register_method("mwn-fo-fd", {"noise", "longtail"}, "Meta-Weight-Net, first order (no lookahead), finite diff.")(
    _mwn("finite_diff", lookahead=False)
)
for _short in ("fd", "fwd"):
    register_method(f"mwn-dl-{_short}", {"noise", "longtail"},
                    f"Meta-Weight-Net, delayed meta update (virtual step from the real gradient), {_ROUTES[_short]}")(
        _mwn(_ROUTES[_short], delayed=True)
    )
