"""Meta-gradient methods: Learning to Reweight and Meta-Weight-Net, one row per hypergradient route."""

from __future__ import annotations

from lightning_reweight.bench.methods import BuildContext, MethodParts, register_method
from lightning_reweight.callbacks.meta_reweight import MetaReweight
from lightning_reweight.meta import L2RW, MetaWeightNet

_ROUTES = {"fd": "finite_diff", "fwd": "forward", "2nd": "second_order"}

#: method-specific settings on top of the shared recipe. MW-Net uses sum-normalised weights (the official WRN-28-10
#: and class-imbalance scripts): unnormalised, the meta gradient mostly scales every weight up and V learned an
#: increasing function of the loss on digits-sym40 (weight AUROC 0.05, test accuracy below CE; see
#: docs/methods/meta_weight_net.md). MW-Net starts after 5 epochs of plain training (chosen from warm-up 0/5/10 on
#: seeds 0-2 of digits-sym40/60: 85.4/89.3/88.4 and 78.1/79.3/81.3 % test accuracy; the paper has no warm-up).
L2RW_SETTINGS: dict[str, float | int] = {"warmup_epochs": 0}
MWN_SETTINGS: dict[str, float | int] = {"warmup_epochs": 5, "meta_lr": 1e-3, "meta_weight_decay": 1e-4, "normalize": 1}


def _l2rw(hypergrad: str):
    def build(ctx: BuildContext) -> MethodParts:
        return MethodParts(callbacks=[MetaReweight(L2RW(), hypergrad=hypergrad, meta_seed=ctx.seed,
                                                   warmup_epochs=int(L2RW_SETTINGS["warmup_epochs"]))])

    return build


def _mwn(hypergrad: str):
    def build(ctx: BuildContext) -> MethodParts:
        strategy = MetaWeightNet(meta_lr=float(MWN_SETTINGS["meta_lr"]),
                                 meta_weight_decay=float(MWN_SETTINGS["meta_weight_decay"]),
                                 normalize=bool(MWN_SETTINGS["normalize"]))
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
