"""Benchmark harness and the command line, on tiny settings."""

import json
import statistics
import sys
import warnings

import pytest
import torch

from lightning_reweight.bench import METHODS, SCENARIOS, MethodParts, register_method, run_benchmark, run_one
from lightning_reweight.bench.report import format_table, summarise
from lightning_reweight.cli import main


class HalfWeights:
    def sample_weights(self, losses, context):
        return torch.full_like(losses, 0.5)


class AttachHalf:
    """A callback that attaches a weighting source and reports an extra metric."""

    def __init__(self):
        from lightning.pytorch import Callback

        class _CB(Callback):
            def setup(self, trainer, pl_module, stage):
                pl_module.attach_weighting("half", HalfWeights())

            def benchmark_metrics(self):
                return {"extra_metric": 42.0}

        self.cb = _CB()


@pytest.fixture
def half_method():
    register_method("test-half", {"clean"}, "test method: halves every weight")(
        lambda ctx: MethodParts(callbacks=[AttachHalf().cb])
    )
    yield "test-half"
    del METHODS["test-half"]


def test_scenarios_match_their_names():
    assert SCENARIOS["digits-sym60"].noise_rate == 0.6 and SCENARIOS["digits-sym60"].noise_kind == "symmetric"
    assert SCENARIOS["digits-pair40"].noise_kind == "pairflip"
    assert SCENARIOS["digits-lt50"].imbalance_ratio == 50.0 and SCENARIOS["digits-lt10"].imbalance_ratio == 10.0
    assert SCENARIOS["digits-clean"].noise_rate == 0.0 and SCENARIOS["digits-clean"].imbalance_ratio == 1.0
    assert "ce" in METHODS and {"clean", "noise", "longtail"} <= METHODS["ce"].tags


def test_run_one_record():
    rec = run_one("ce", "digits-lt10", seed=1, epochs=2)
    assert rec["scenario"] == "digits-lt10" and rec["seed"] == 1 and rec["epochs"] == 2
    assert 0.0 <= rec["test_acc"] <= 100.0 and 0.0 <= rec["test_balanced_acc"] <= 100.0
    assert rec["step_time_ms"] > 0 and rec["steps_timed"] > 0
    # float64 counts (the curve) against torchmetrics' float32: equal accuracies may differ in the 7th digit
    assert rec["best_test_acc"] >= rec["test_acc"] - 1e-4 and rec["best_epoch"] in (0, 1)
    with pytest.raises(ValueError, match="unknown method"):
        run_one("nope", "digits-clean")


def test_run_benchmark_adds_baseline_first_and_ratios(half_method):
    result = run_benchmark([half_method], ["digits-clean", "digits-lt10"], seeds=[0], epochs=2, progress=False)
    recs = result["records"]
    # test-half only applies to "clean" scenarios; the baseline runs everywhere, first
    assert [(r["method"], r["scenario"]) for r in recs] == [
        ("ce", "digits-clean"), ("test-half", "digits-clean"), ("ce", "digits-lt10"),
    ]
    ce, half = recs[0], recs[1]
    assert ce["step_time_ratio"] == pytest.approx(1.0)
    assert half["step_time_ratio"] == pytest.approx(half["step_time_ms"] / ce["step_time_ms"])
    assert half["extra_metric"] == 42.0
    assert result["meta"]["scenarios"]["digits-clean"]["noise_rate"] == 0.0


def test_summarise_against_statistics():
    recs = [
        {"method": "m", "scenario": "s", "seed": i, "test_acc": a, "test_balanced_acc": b, "step_time_ratio": r}
        for i, (a, b, r) in enumerate([(90.0, 80.0, 1.1), (92.0, 81.0, 1.3), (97.0, 85.0, 1.2)])
    ]
    (row,) = summarise(recs)
    assert row["test_acc_mean"] == pytest.approx(statistics.mean([90, 92, 97]))
    assert row["test_acc_std"] == pytest.approx(statistics.stdev([90, 92, 97]))
    assert row["step_time_ratio_mean"] == pytest.approx(1.2)
    assert "m" in format_table([row]) and "93.00" in format_table([row])


def test_cli_benchmark_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["benchmark", "--methods", "ce", "--scenarios", "digits-clean", "--seeds", "0", "1",
                 "--epochs", "1", "--output", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "digits-clean" in printed and "balanced acc" in printed
    data = json.loads(out.read_text())
    assert [r["seed"] for r in data["records"]] == [0, 1]
    assert data["summary"][0]["seeds"] == 2 and data["meta"]["preset"] == "quick"


@pytest.mark.parametrize("command_line", [False, True])
def test_cli_fit_runs_lightning_cli(tmp_path, monkeypatch, command_line):
    argv = ["fit", "--trainer.max_epochs=1", "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--data.init_args.noise_rate=0.2"]
    monkeypatch.setattr(sys, "argv", ["lightning-reweight", *argv] if command_line else ["pytest"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(None if command_line else argv)
    assert code == 0
    assert (tmp_path / "lightning_logs").exists()
    assert not [w for w in caught if "args parameter" in str(w.message)]  # the console script's own arguments


def test_cli_usage(capsys):
    assert main([]) == 0 and "benchmark" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_test_curve_matches_snapshots_and_trainer_test_and_leaves_training_unchanged():
    """Per-epoch test accuracy = plain-torch evaluation of that epoch's weights; the last one = trainer.test's
    torchmetrics figures; a run with the curve (dropout draws from the RNG) ends with the same weights."""
    import copy

    import lightning as L
    from lightning.pytorch import Callback

    from lightning_reweight.bench.runner import make_datamodule, make_trainer
    from lightning_reweight.bench.test_curve import TestCurve
    from lightning_reweight.classifier import ReweightClassifier
    from lightning_reweight.models import MLP

    class Snapshots(Callback):
        def __init__(self):
            self.states = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.states.append(copy.deepcopy(pl_module.state_dict()))

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        dm = make_datamodule(SCENARIOS["digits-lt10"], 0)
        model = ReweightClassifier(MLP(64, 10, hidden=(32,), dropout=0.3), 10, lr=0.05, momentum=0.9)
        trainer = make_trainer(3, callbacks)
        trainer.fit(model, datamodule=dm)
        return trainer, model, dm

    curve, snaps = TestCurve(batch_size=100), Snapshots()
    trainer, model, dm = fit([snaps, curve])
    _, plain, _ = fit([])
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)

    x = torch.cat([b[0] for b in dm.test_dataloader()])
    y = torch.cat([b[1] for b in dm.test_dataloader()])
    ref = ReweightClassifier(MLP(64, 10, hidden=(32,), dropout=0.3), 10).eval()
    for epoch, state in enumerate(snaps.states):
        ref.load_state_dict(state)
        with torch.no_grad():
            hit = (ref(x).argmax(1) == y).double()
        recall = [float(hit[y == c].mean()) for c in y.unique()]
        assert curve.acc[epoch] == pytest.approx(100 * float(hit.mean()), abs=1e-9)
        assert curve.balanced_acc[epoch] == pytest.approx(100 * statistics.mean(recall), abs=1e-6)
    (test,) = trainer.test(model, datamodule=dm, verbose=False)
    assert curve.acc[-1] == pytest.approx(100 * test["test/acc"], abs=1e-4)
    assert curve.balanced_acc[-1] == pytest.approx(100 * test["test/balanced_acc"], abs=1e-4)
    best = curve.best()
    assert best["best_test_acc"] == max(curve.acc) == curve.acc[best["best_epoch"]]
    assert best["best_test_balanced_acc"] == max(curve.balanced_acc)


class _FakeRuns:
    """Stands in for run_one (the orchestration is under test): step time = 10 ms per call, accuracy from the key;
    raises KeyboardInterrupt at call number ``crash_at``."""

    def __init__(self, crash_at=None):
        self.calls, self.crash_at = [], crash_at

    def __call__(self, method, scenario, seed, *, epochs=None):
        self.calls.append((method, scenario, seed))
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise KeyboardInterrupt
        return {"method": method, "scenario": scenario, "seed": seed, "test_acc": 50.0 + seed,
                "test_balanced_acc": 50.0, "step_time_ms": 10.0 * len(self.calls),
                "epochs": SCENARIOS[scenario].recipe.epochs if epochs is None else epochs}


def test_interrupted_benchmark_keeps_its_records_and_resumes(tmp_path, monkeypatch, capsys):
    import lightning_reweight.bench.runner as runner

    out = tmp_path / "bench.json"
    argv = ["benchmark", "--methods", "absgd", "ldam", "--scenarios", "digits-lt10", "digits-lt50",
            "--seeds", "0", "1", "--epochs", "1", "--output", str(out), "--no-progress"]
    jobs = [(m, s, seed) for s in ("digits-lt10", "digits-lt50") for seed in (0, 1) for m in ("ce", "absgd", "ldam")]
    first = _FakeRuns(crash_at=6)  # dies during the 6th run: digits-lt10 seed 1, ldam
    monkeypatch.setattr(runner, "run_one", first)
    assert main(argv) == 130  # Ctrl-C: a line saying what was kept and how to go on, not a traceback
    assert "interrupted: 5 records saved to" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["meta"]["complete"] is False
    assert [(r["method"], r["scenario"], r["seed"]) for r in saved["records"]] == jobs[:5]

    second = _FakeRuns()
    monkeypatch.setattr(runner, "run_one", second)
    assert main([*argv, "--resume"]) == 0
    # the missing jobs, plus the baseline of the one scenario/seed that still had jobs to run
    assert second.calls == [jobs[3], jobs[5], *jobs[6:]]
    result = json.loads(out.read_text())
    assert result["meta"]["complete"] is True and "resumed" in result["meta"]
    assert [(r["method"], r["scenario"], r["seed"]) for r in result["records"]] == jobs
    by_key = {(r["method"], r["scenario"], r["seed"]): r for r in result["records"]}
    assert by_key[jobs[1]]["step_time_ratio"] == pytest.approx(20.0 / 10.0)  # kept: measured in the first process
    assert by_key[jobs[5]]["step_time_ratio"] == pytest.approx(20.0 / 10.0)  # new: against the re-run baseline
    with pytest.raises(SystemExit, match="holds runs of 1 epochs .* this run trains 2"):
        main([*argv[:-5], "--epochs", "2", "--output", str(out), "--no-progress", "--resume"])


def test_benchmark_output_checks_and_the_earlier_results(tmp_path, monkeypatch, capsys):
    """Found by a review of the command as a user: an output under a file passed the up-front check and crashed
    after the first run; running again without --resume replaced a complete results file with the new run's first
    record; valid JSON of another shape crashed --resume with a traceback; --resume refused the recipe's own
    epochs given explicitly (None against 60); an unknown command printed only the usage."""
    import lightning_reweight.bench.runner as runner

    runs = _FakeRuns()
    monkeypatch.setattr(runner, "run_one", runs)
    base = ["benchmark", "--methods", "ce", "--scenarios", "digits-clean", "--seeds", "0", "--no-progress"]
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="afile is a file, not a directory"):
        main([*base, "--output", str(tmp_path / "afile" / "x.json")])
    assert runs.calls == []
    out = tmp_path / "bench.json"
    assert main([*base, "--output", str(out)]) == 0
    first = out.read_text()
    assert json.loads(first)["records"][0]["epochs"] == SCENARIOS["digits-clean"].recipe.epochs
    runs.crash_at = len(runs.calls) + 1
    assert main([*base, "--output", str(out)]) == 130  # a second run, interrupted before its first record
    assert (tmp_path / "bench.previous.json").read_text() == first  # the earlier results are kept aside
    assert "moved the earlier" in capsys.readouterr().err
    runs.crash_at = None
    (tmp_path / "bench.previous.json").replace(out)
    assert main([*base, "--output", str(out), "--resume", "--epochs", "60"]) == 0  # 60 is the recipe's
    assert runs.calls[-1] == ("ce", "digits-clean", 0) and len(json.loads(out.read_text())["records"]) == 1
    for content in ("[1, 2]", '{"records": [{"method": "ce"}]}', '{"records": 3}'):
        out.write_text(content)
        with pytest.raises(SystemExit, match="not a benchmark JSON file"):
            main([*base, "--output", str(out), "--resume"])
    assert main(["fitt"]) == 2 and "unknown command 'fitt'" in capsys.readouterr().err


def test_benchmark_refuses_what_it_would_silently_drop_or_crash_on_late(tmp_path, monkeypatch, capsys):
    """A resume with another selection dropped the file's other records; methods meant for none of the scenarios
    ran nothing; repeated seeds ran twice and counted twice; bad seeds/outputs failed with tracebacks, an
    unwritable output only after the first run."""
    import lightning_reweight.bench.runner as runner

    out = tmp_path / "bench.json"
    runs = _FakeRuns()
    monkeypatch.setattr(runner, "run_one", runs)
    base = ["benchmark", "--epochs", "1", "--no-progress"]
    assert main([*base, "--methods", "absgd", "--scenarios", "digits-lt10", "--seeds", "0", "0", "1",
                 "--output", str(out)]) == 0
    assert [(m, seed) for m, _, seed in runs.calls] == [("ce", 0), ("absgd", 0), ("ce", 1), ("absgd", 1)]
    kept = out.read_text()
    with pytest.raises(SystemExit, match="outside this selection"):
        main([*base, "--methods", "absgd", "--scenarios", "digits-lt10", "--seeds", "0", "--output", str(out),
              "--resume"])
    assert out.read_text() == kept  # nothing lost
    with pytest.raises(SystemExit, match="ldam applies to none of the scenarios"):
        main([*base, "--methods", "ldam", "--scenarios", "digits-sym40", "--output", str(tmp_path / "x.json")])
    runs.calls.clear()
    assert main([*base, "--methods", "ldam", "--scenarios", "digits-sym40", "digits-lt10", "--seeds", "0",
                 "--output", str(tmp_path / "y.json")]) == 0
    assert "ldam is not run on ['digits-sym40']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--seeds", "-3", "--output", str(tmp_path / "z.json")])
    assert "seeds must be >= 0" in capsys.readouterr().err
    runs.calls.clear()
    with pytest.raises(SystemExit, match="is a directory"):
        main([*base, "--methods", "ce", "--scenarios", "digits-clean", "--output", str(tmp_path)])
    assert runs.calls == []  # refused before any run
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a benchmark JSON file"):
        main([*base, "--methods", "ce", "--scenarios", "digits-clean", "--output", str(tmp_path / "bad.json"),
              "--resume"])


def test_cli_does_not_save_the_parsed_config_over_the_users_config_file(tmp_path, monkeypatch):
    """Without a logger the parsed config is saved into the working directory: over ./config.yaml if the user's
    own config has that name (LightningCLI's overwrite=True). That is refused; a second run still works."""
    monkeypatch.chdir(tmp_path)
    mine = "# my settings\ntrainer:\n  max_epochs: 1\n"
    (tmp_path / "config.yaml").write_text(mine)
    argv = ["fit", "--config", "config.yaml", "--trainer.logger", "false", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false"]  # (fast_dev_run would save no config at all)
    with pytest.raises(SystemExit, match="over your config file"):  # a message, not a traceback
        main(argv)
    assert (tmp_path / "config.yaml").read_text() == mine
    (tmp_path / "mine.yaml").write_text(mine)
    for _ in range(2):  # a previous run's saved config.yaml is overwritten, as before
        assert main([*argv[:2], "mine.yaml", *argv[3:]]) == 0
    assert (tmp_path / "mine.yaml").read_text() == mine and "seed_everything" in (tmp_path / "config.yaml").read_text()


def test_quiet_keeps_the_librarys_own_warnings():
    """quiet() ignored UserWarnings of every module whose name starts with "lightning", lightning_reweight's
    included: a benchmark (or the ABSGD example) with a stage that never starts ran without a word."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight import ReweightClassifier
    from lightning_reweight.bench.runner import quiet
    from lightning_reweight.callbacks import MetaReweight
    from lightning_reweight.meta import L2RW
    from lightning_reweight.models import MLP

    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    with quiet(), warnings.catch_warnings(record=True) as caught:
        L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, limit_val_batches=0,
                  callbacks=[MetaReweight(L2RW(), meta_dataloader=DataLoader(data, batch_size=8), warmup_epochs=5)],
                  ).fit(ReweightClassifier(MLP(4, 2, hidden=(4,)), 2), DataLoader(data, batch_size=8))
    messages = [str(w.message) for w in caught]
    assert any("warmup_epochs=5 is never reached with max_epochs=2" in m for m in messages)
    # Lightning's own stay quiet (ReweightClassifier defines validation_step, the run has no validation data)
    assert not any("validation_step" in m for m in messages)
    assert all("lightning_reweight" in str(w.filename) for w in caught), [str(w.filename) for w in caught]


def test_test_curve_takes_each_best_at_its_own_epoch():
    """The best balanced accuracy is the maximum of its own curve, not the value at the best-accuracy epoch."""
    from lightning_reweight.bench.test_curve import TestCurve

    curve = TestCurve()
    curve.acc, curve.balanced_acc = [50.0, 60.0, 55.0], [70.0, 40.0, 65.0]
    assert curve.best() == {"best_test_acc": 60.0, "best_epoch": 1, "best_test_balanced_acc": 70.0,
                            "best_balanced_epoch": 0}


def test_test_curve_balanced_accuracy_leaves_out_classes_absent_from_the_test_set():
    """Mean recall over the classes the test set has (class 2 absent), written out by hand."""
    import types

    from lightning_reweight.bench.test_curve import TestCurve

    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts the class stored in the input's first feature
            return torch.nn.functional.one_hot(x[:, 0].long(), 4).float()

    y = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3])
    pred = torch.tensor([0, 0, 1, 1, 3, 3, 3, 0, 2])
    curve = TestCurve()
    curve._data = (pred.float().unsqueeze(1), y)
    module = Fixed()
    module.device = torch.device("cpu")
    curve.on_train_epoch_end(types.SimpleNamespace(), module)
    recalls = [2 / 3, 1 / 2, 2 / 4]  # classes 0, 1, 3
    assert curve.balanced_acc == [pytest.approx(100 * sum(recalls) / 3)]
    assert curve.acc == [pytest.approx(100 * 5 / 9)]


# ---------------------------------------------------------------------------- scenarios and recipes reach the run
def test_scenario_names_state_their_settings():
    """digits-symNN / pairNN: NN% symmetric / pair-flip noise on balanced data; digits-ltNN: exponential imbalance NN;
    digits-clean: neither. The tags say which kind of method applies."""
    import re

    for name, sc in SCENARIOS.items():
        m = re.fullmatch(r"digits-(?:(clean)|sym(\d+)|pair(\d+)|lt(\d+))", name)
        assert m, name
        clean, sym, pair, lt = m.groups()
        rate = int(sym or pair or 0) / 100
        kind = "pairflip" if pair else "symmetric"
        ratio = float(lt) if lt else 1.0
        assert (sc.noise_rate, sc.noise_kind, sc.imbalance_ratio, sc.imbalance_profile) == (rate, kind, ratio, "exp")
        assert sc.tags == frozenset({"clean" if clean else "longtail" if lt else "noise"})


def test_the_benchmark_datamodule_follows_the_scenario_and_the_seed():
    """Noise kind and rate, imbalance profile and ratio, meta set size and the seed all reach the digits data."""
    from lightning_reweight.bench.runner import make_datamodule
    from lightning_reweight.bench.scenarios import Recipe, Scenario

    sc = Scenario("step-pair", noise_rate=0.3, noise_kind="pairflip", imbalance_ratio=4.0, imbalance_profile="step",
                  recipe=Recipe(meta_per_class=5))
    dm, other_seed = make_datamodule(sc, 0), make_datamodule(sc, 1)
    counts = dm.clean_train_class_counts
    assert counts[:5] == [counts[0]] * 5 and counts[5:] == [counts[0] // 4] * 5  # the step profile at ratio 4
    mask = dm.noise_mask
    assert int(mask.sum()) == round(0.3 * len(dm.train_dataset))
    assert torch.equal(dm.train_targets[mask], (dm.clean_train_targets[mask] + 1) % 10)  # pair flip j -> j + 1
    assert len(dm.meta_dataset) == 50
    assert not torch.equal(dm.meta_indices, other_seed.meta_indices)  # each seed its own split and noise
    assert not torch.equal(dm.noise_mask[:100], other_seed.noise_mask[:100])


def test_run_one_trains_with_the_recipe_and_the_methods_parts(monkeypatch):
    """The module gets the recipe's optimisation settings and hidden widths, LDAM's cosine head; a seed makes the
    run reproducible; the record's last-epoch figures are those of the final weights (with one epoch, the test
    curve's only point)."""
    from torch import nn

    import lightning_reweight.bench.runner as runner
    from lightning_reweight import ReweightClassifier
    from lightning_reweight.bench.scenarios import Recipe, Scenario
    from lightning_reweight.models import NormalizedLinear

    built = []

    class Recording(ReweightClassifier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(runner, "ReweightClassifier", Recording)
    recipe = Recipe(epochs=1, lr=0.03, momentum=0.5, weight_decay=1e-3, hidden=(16,), meta_per_class=5)
    sc = Scenario("tiny-lt", imbalance_ratio=10.0, tags=frozenset({"longtail"}), recipe=recipe)
    rec = runner.run_one("ldam", sc, seed=2)
    model = built[0]
    assert (model.hparams.lr, model.hparams.momentum, model.hparams.weight_decay) == (0.03, 0.5, 1e-3)
    assert [m.out_features for m in model.backbone.modules() if isinstance(m, nn.Linear)] == [16]
    assert isinstance(model.backbone.classifier, NormalizedLinear)
    assert rec["test_acc"] == pytest.approx(rec["best_test_acc"], abs=1e-4)
    assert rec["test_balanced_acc"] == pytest.approx(rec["best_test_balanced_acc"], abs=1e-4)
    again = runner.run_one("ldam", sc, seed=2)
    assert again["test_acc"] == rec["test_acc"]
    for a, b in zip(built[0].parameters(), built[1].parameters()):
        assert torch.equal(a, b)


def test_summaries_leave_out_missing_and_nan_values_and_the_table_shows_each_column():
    """A record without a value (None, e.g. no baseline ratio) or with NaN (JSON's NaN) is left out of that mean; the
    table's columns hold accuracy, balanced accuracy, best accuracy and the ratio, in that order."""
    recs = [
        {"method": "m", "scenario": "s", "seed": 0, "test_acc": 90.0, "test_balanced_acc": 70.0,
         "best_test_acc": 95.0, "step_time_ratio": 1.5},
        {"method": "m", "scenario": "s", "seed": 1, "test_acc": float("nan"), "test_balanced_acc": 74.0,
         "best_test_acc": 97.0, "step_time_ratio": None},
        {"method": "m", "scenario": "s", "seed": 2, "test_acc": 94.0, "test_balanced_acc": 72.0,
         "step_time_ratio": 2.5},
    ]
    (row,) = summarise(recs)
    assert (row["test_acc_mean"], row["test_acc_std"]) == pytest.approx((92.0, statistics.stdev([90.0, 94.0])))
    assert (row["best_test_acc_mean"], row["step_time_ratio_mean"]) == pytest.approx((96.0, 2.0))
    assert row["test_balanced_acc_mean"] == pytest.approx(72.0) and row["seeds"] == 3
    tokens = format_table([row]).splitlines()[2].split()
    assert tokens[:2] == ["s", "m"] and tokens[-1] == "3"
    numbers = [float(t) for t in tokens[2:-1] if t != "±"]
    assert numbers == pytest.approx([92.0, 2.83, 72.0, 2.0, 96.0, 1.41, 2.0], abs=0.006)


def test_test_curve_leaves_the_random_number_generator_as_it_found_it():
    """A model that draws random numbers even in eval mode (noise injection, MC dropout): evaluating the test curve
    must not advance torch's generator, or the run with the curve would train differently from the run without."""
    import types

    from lightning_reweight.bench.test_curve import TestCurve

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + 0.01 * torch.rand_like(x)

    curve = TestCurve(batch_size=4)
    curve._data = (torch.eye(3).repeat(4, 1), torch.arange(3).repeat(4))
    module = Noisy()
    module.device = torch.device("cpu")
    torch.manual_seed(0)
    expected_next = torch.rand(5)
    torch.manual_seed(0)
    curve.on_train_epoch_end(types.SimpleNamespace(), module)
    assert torch.equal(torch.rand(5), expected_next)
    assert curve.acc == [100.0]


def test_ctrl_c_inside_a_run_reaches_the_command_as_an_interrupt():
    """Lightning ends a fit interrupted by Ctrl-C with ``sys.exit(1)``: the benchmark then exited with status 1 and
    no word (its quiet mode hides Lightning's own line), instead of saying what was saved and how to resume."""
    import signal

    from lightning.pytorch import Callback

    class CtrlC(Callback):
        def __init__(self, phase):
            self.phase = phase

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.phase == "fit":
                raise KeyboardInterrupt

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if self.phase == "test":
                raise KeyboardInterrupt

    for phase in ("fit", "test"):
        register_method("test-ctrl-c", {"clean"}, "test method: interrupted")(
            lambda ctx, phase=phase: MethodParts(callbacks=[CtrlC(phase)]))
        handler = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(KeyboardInterrupt):
                run_one("test-ctrl-c", "digits-clean", 0, epochs=1)
        finally:
            signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on
            del METHODS["test-ctrl-c"]
