"""The ``lightning-reweight`` command: ``benchmark`` (the results table) and LightningCLI's ``fit``/``test``.

Examples::

    lightning-reweight benchmark                       # quick preset, prints the table, writes JSON
    lightning-reweight benchmark --preset full --output benchmarks/results/digits.json
    lightning-reweight fit --data.init_args.noise_rate 0.6 --trainer.max_epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

__all__ = ["main"]

_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {value}")
    return value


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))  # a repeated seed or method would run twice and count as two


def _check_output(output: str) -> None:
    """Fail before the first run (not after it) when the results cannot be written to ``output``."""
    from pathlib import Path

    path = Path(output)
    if path.is_dir():
        raise SystemExit(f"--output {output} is a directory; give a file name, e.g. {path / 'benchmark.json'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SystemExit(f"--output {output}: {parent} is a file, not a directory")
    import tempfile

    try:  # os.access says yes to root everywhere (also in /proc): try writing there
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise SystemExit(f"--output {output}: cannot write into {parent} ({err.strerror or err})") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_seed.__name__ = _positive_int.__name__ = "integer"  # argparse's message: "invalid integer value: 'abc'"


def _keep_previous(output: str) -> str | None:
    """Move an existing ``output`` aside (``<name>.previous.json``) before a new run writes its first record."""
    from pathlib import Path

    path = Path(output)
    if not path.is_file():
        return None
    previous = path.with_name(f"{path.stem}.previous{path.suffix}")
    path.replace(previous)
    return str(previous)


def _benchmark_parser() -> argparse.ArgumentParser:
    from lightning_reweight.bench import METHODS, PRESETS, SCENARIOS

    p = argparse.ArgumentParser(
        prog="lightning-reweight benchmark",
        description=(
            "Train the registered methods on the digits scenarios; print and save the results table. The quick "
            "preset (default) skips the variant rows of the meta methods (other hypergradient modes, first-order "
            "and delayed MW-Net); --preset standard or "
            "full runs every registered method."
        ),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="scenario/seed/method selection")
    p.add_argument(
        "--methods", nargs="+", choices=sorted(METHODS),
        help="methods (default: the preset's; quick skips " + ", ".join(PRESETS["quick"]["exclude_methods"]) + ")",
    )
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), help="override the preset's scenarios")
    p.add_argument("--seeds", nargs="+", type=_seed, help="override the preset's seeds")
    p.add_argument("--epochs", type=_positive_int, help="override the number of epochs (default: the recipe's, 60)")
    p.add_argument("--output", default="results/benchmark.json", help="where to write the JSON records")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--resume", action="store_true",
        help="keep the records already in --output (written after every run) and run only the missing ones; "
        "without it an existing --output is moved to <name>.previous.json first (replacing an older one)",
    )
    return p


def benchmark(argv: Sequence[str]) -> int:
    """Run the benchmark command."""
    from lightning_reweight.bench import METHODS, PRESETS, run_benchmark
    from lightning_reweight.bench.report import format_table, summarise, write_json
    from lightning_reweight.bench.runner import BASELINE

    args = _benchmark_parser().parse_args(list(argv))
    preset = PRESETS[args.preset]
    scenarios = args.scenarios or preset["scenarios"]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    if epochs is not None and epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    methods = args.methods
    if methods is None:
        excluded = set(preset.get("exclude_methods", []))
        methods = [m for m in METHODS if m not in excluded]
    methods, scenarios, seeds = _unique(methods), _unique(scenarios), _unique(seeds)
    _check_applicable(methods, scenarios, explicit=args.methods is not None)
    _check_output(args.output)
    done = _resumable_records(args.output, epochs) if args.resume else []
    selection = {(m, s, seed) for m in [*methods, BASELINE] for s in scenarios for seed in seeds}
    others = sorted({(r["method"], r["scenario"], r["seed"]) for r in done} - selection)
    if others:
        raise SystemExit(
            f"--resume: {args.output} also holds records outside this selection (e.g. {others[:3]}); resuming "
            "would drop them: run with the same --methods/--scenarios/--seeds, or another --output"
        )

    moved = None if args.resume else _keep_previous(args.output)
    if moved:
        print(f"note: moved the earlier {args.output} to {moved} (--resume continues an interrupted run instead)",
              file=sys.stderr)
    saved = [len(done)]

    def save(partial: dict) -> None:  # after every run: an interrupted benchmark keeps what it measured
        partial["meta"]["preset"] = args.preset
        write_json(partial, args.output)
        saved[0] = len(partial["records"])

    try:
        result = run_benchmark(methods, scenarios, seeds, epochs=epochs, progress=not args.no_progress, done=done,
                               on_record=save)
    except KeyboardInterrupt:
        where = f"saved to {args.output} (marked incomplete)" if saved[0] else "saved"
        earlier = f"; the earlier results are in {moved}" if moved else ""
        print(f"\ninterrupted: {saved[0]} records {where}; run the same command with --resume to finish it{earlier}",
              file=sys.stderr)
        return 130
    result["meta"]["preset"] = args.preset
    print(format_table(summarise(result["records"])))
    path = write_json(result, args.output)
    kept = f" ({len(done)} read from the earlier run in that file)" if done else ""
    print(f"\nwrote {len(result['records'])} records to {path}{kept}")
    return 0


def _check_applicable(methods: Sequence[str], scenarios: Sequence[str], *, explicit: bool) -> None:
    """Refuse requested methods that apply to none of the scenarios; say which pairs are skipped."""
    from lightning_reweight.bench import METHODS, SCENARIOS
    from lightning_reweight.bench.runner import BASELINE, applicable

    if not explicit:
        return
    for method in methods:
        if method == BASELINE:
            continue
        skipped = [s for s in scenarios if not applicable(method, SCENARIOS[s])]
        if len(skipped) == len(scenarios):
            raise SystemExit(
                f"{method} applies to none of the scenarios {list(scenarios)} (its tags: "
                f"{sorted(METHODS[method].tags)}); choose scenarios it is meant for"
            )
        if skipped:
            print(f"note: {method} is not run on {skipped} (not meant for them)", file=sys.stderr)


def _resumable_records(output: str, epochs: int | None) -> list[dict]:
    """The records of an earlier (interrupted) run in ``output``, checked to have been run with the same epochs."""
    import json
    from pathlib import Path

    from lightning_reweight.bench import SCENARIOS

    path = Path(output)
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"--resume: {output} is not a benchmark JSON file ({err}); use another --output") from None
    records = previous.get("records") if isinstance(previous, dict) else None
    keys = ("method", "scenario", "seed", "epochs")
    if not isinstance(records, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in records):
        raise SystemExit(
            f"--resume: {output} is not a benchmark JSON file (no list of records with {', '.join(keys)}); use "
            "another --output"
        )
    for r in records:  # the epochs each record was trained for, against this run's (the recipe's when not given)
        scenario = SCENARIOS.get(r["scenario"])
        want = epochs if epochs is not None else (scenario.recipe.epochs if scenario is not None else r["epochs"])
        if r["epochs"] != want:
            raise SystemExit(
                f"--resume: {output} holds runs of {r['epochs']} epochs ({r['method']} on {r['scenario']}), this "
                f"run trains {want}; use another --output or the same --epochs"
            )
    return list(records)


def lightning_cli(argv: Sequence[str]) -> int:
    """LightningCLI over :class:`ReweightClassifier` and any :class:`ReweightDataModule` (digits by default)."""
    try:
        from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(f'{err}: install the CLI extra: pip install "lightning-reweight[cli]"') from err
    from lightning_reweight.classifier import ReweightClassifier
    from lightning_reweight.data import ReweightDataModule

    class SaveAndLogConfig(SaveConfigCallback):
        """Also put the whole parsed config into every W&B run's config, under ``cli``.

        The model's own hyperparameters leave the criterion out; with the config (criterion, callbacks, data) runs
        can be told apart and filtered in W&B.
        """

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            """Refuse to overwrite one of the run's own ``--config`` files with the parsed config.

            A previous run's saved config is overwritten (runs without a logger save into the working directory);
            the user's config file there is not.
            """
            if self.save_to_log_dir and not self.already_saved and trainer.log_dir is not None:
                target = os.path.abspath(os.path.join(trainer.log_dir, self.config_filename))
                given = {os.path.abspath(str(p)) for p in (self.config.get("config") or [])}
                if target in given:
                    raise SystemExit(
                        f"lightning-reweight would save the parsed config over your config file {target}: run from "
                        "another directory, or give --trainer.default_root_dir (or a logger) another directory"
                    )
            super().setup(trainer, pl_module, stage)

        def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
            from lightning.pytorch.loggers import WandbLogger

            loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
            if loggers:
                config = json.loads(self.parser.dump(self.config, format="json", skip_none=False))
                for logger in loggers:
                    logger.log_hyperparams({"cli": config})

    default = resources.files("lightning_reweight") / "configs" / "digits.yaml"
    LightningCLI(
        ReweightClassifier,
        ReweightDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveAndLogConfig,
        # the command line itself is read by LightningCLI (handing it over as args makes it warn about both)
        args=None if list(argv) == sys.argv[1:] else list(argv),
        parser_kwargs={cmd: {"default_config_files": [str(default)]} for cmd in _LIGHTNING_SUBCOMMANDS},
        save_config_kwargs={"overwrite": True},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-reweight`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: lightning-reweight {benchmark,fit,validate,test,predict} [options]\n"
        "  benchmark   train the registered methods on the digits scenarios and print the results table\n"
        "  fit ...     LightningCLI training (default config: MLP on 40%-noisy digits); --help for options"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] == "benchmark":
        return benchmark(argv[1:])
    if argv[0] in _LIGHTNING_SUBCOMMANDS:
        return lightning_cli(argv)
    print(f"lightning-reweight: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
