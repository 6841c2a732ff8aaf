"""Compare preference methods on one config: `python -m axolotl_bnf_plugin.compare config.yml --methods dpo bnf asft`.

Given an ordinary Axolotl config without `rl:`, it writes one config per method (`configs`), trains
each with `axolotl train` in a subprocess (so every run is exactly what a user of that method gets: Axolotl's
own trainer for dpo / ipo / simpo / orpo, the plugin's for bnf / asft), and reads back what the plugin's
probe logged in each (`callback`: the same pairs scored the same way in every run). It then writes the
table and the two figures under the config's `output_dir` (`report`) and prints the table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .configs import CompareConfigError, check_methods, derive_configs, known_methods

DEFAULT_METHODS = ("dpo", "bnf", "asft")


def _axolotl_command() -> list[str]:
    """`axolotl` next to this Python (a virtual environment's own), else the one on PATH."""
    beside = Path(sys.executable).with_name("axolotl")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("axolotl")
    if found is None:
        raise CompareConfigError("the `axolotl` command is not installed next to this Python or on PATH")
    return [found]


def read_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CompareConfigError(f"{path}: cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise CompareConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(cfg, dict):
        raise CompareConfigError(f"{path}: expected a YAML mapping of Axolotl keys")
    return cfg


def run_method(method: str, cfg: dict, config_dir: Path, log_dir: Path) -> float:
    """Write the method's config and run `axolotl train` on it; return its wall time. A failed run stops the
    comparison, naming the method and its log."""
    config_path = config_dir / f"{method}.yml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    log_path = log_dir / f"{method}.log"
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": os.environ.get("AXOLOTL_DO_NOT_TRACK", "1")}
    print(f"[compare] {method}: axolotl train {config_path}  (log: {log_path})", flush=True)
    began = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run([*_axolotl_command(), "train", str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{method}: axolotl train failed (exit {proc.returncode}); full log: {log_path}\n{tail}")
    print(f"[compare] {method}: done in {seconds:.0f} s", flush=True)
    return seconds


def _compare_one(cfg: dict, methods: list[str], probe_size: int | None, report_only: bool, path: str) -> str:
    from .report import write_report

    configs = derive_configs(cfg, methods, probe_size, path=path)
    out = Path(cfg["output_dir"])
    config_dir = out / "compare_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    if not report_only:
        for method, method_cfg in configs.items():
            run_method(method, method_cfg, config_dir, config_dir)
    table, paths = write_report(out, list(configs))
    print(table)
    print("[compare] wrote " + ", ".join(str(p) for p in paths), flush=True)
    return table


def compare(config_path: str | Path, methods: list[str], probe_size: int | None = None,
            report_only: bool = False, learning_rates: list[float] | None = None,
            seeds: list[int] | None = None) -> str:
    """Derive, train (unless `report_only`) and report; returns the table. With `learning_rates` and / or
    `seeds`, one comparison per (learning rate, seed) and their mean and spread (`sweep`)."""
    from .sweep import cell_config, write_sweep_report

    cfg = read_config(config_path)
    derive_configs(cfg, methods, probe_size, path=str(config_path))  # refuse a bad config before any run
    if cfg.get("sample_packing"):
        print("[compare] sample_packing is off for every run: Axolotl refuses it with rl: dpo and its family",
              flush=True)
    if not learning_rates and not seeds:
        return _compare_one(cfg, methods, probe_size, report_only, str(config_path))
    if not learning_rates and cfg.get("learning_rate") is None:
        raise CompareConfigError(f"{config_path} has no `learning_rate:`; set it or pass --learning-rates")
    learning_rates = learning_rates or [float(cfg["learning_rate"])]
    seeds = seeds if seeds else [int(cfg.get("seed") or 0)]
    methods = check_methods(methods)
    for lr in learning_rates:
        for seed in seeds:
            print(f"[compare] learning rate {lr:g}, seed {seed}", flush=True)
            _compare_one(cell_config(cfg, lr, seed), methods, probe_size, report_only, str(config_path))
    table, paths = write_sweep_report(cfg["output_dir"], methods, learning_rates, seeds)
    print(table)
    print("[compare] wrote " + ", ".join(str(p) for p in paths), flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axolotl_bnf_plugin.compare", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an Axolotl config without `rl:` (the plugin line is optional)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"methods to train and compare (default: {' '.join(DEFAULT_METHODS)}); "
                             f"known: {', '.join(known_methods())}")
    parser.add_argument("--probe-size", type=int, default=None,
                        help="probe pairs (bnf_compare_probe_size; default: the config's, else 64)")
    parser.add_argument("--learning-rates", nargs="+", type=float, default=None,
                        help="run the comparison at each of these learning rates (with --seeds: every pair) and "
                             "report mean and spread over the seeds")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run the comparison with each of these seeds and report mean and spread")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: rebuild the table and figures from the runs already in output_dir")
    args = parser.parse_args(argv)
    try:
        compare(args.config, args.methods, args.probe_size, args.report_only, args.learning_rates, args.seeds)
    except (CompareConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # also `python -m axolotl_bnf_plugin.compare` (__main__.py)
    sys.exit(main())
