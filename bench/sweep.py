"""Run a plan of recipe variants (``fewstep fit|cache|couplings`` jobs) in parallel and collect
their logged validation curves into one JSON file.

    python bench/sweep.py bench/plans/demo_recipes.yaml --jobs 10 --out runs/sweep/results.json

A plan YAML has ``vars`` (defaults, overridable with ``--var name=value``) and ``jobs``: each job
has a ``name``, a ``command`` (fit, cache or couplings), a ``base`` config (or a list of configs
layered in order, as ``-c a -c b``: e.g. a recipe plus its ``_long`` overlay, so a plan keeps
the recipe it ran on when the default configs move), ``patches`` (dotted keys into the config ->
values; integer keys index lists) and ``after`` (names it waits for).
String values may use ``{name}`` (the job's name) and ``{var}`` placeholders. Quality per step
does not depend on the device, so a GPU runs the sweep quickly and the CPU cost of each variant
comes from its steps (the README's "Recipe search on a GPU" or the plan's comments).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_ROOT = Path("runs/sweep")
CURVES = ("geneval/overall", "val/loss", "mse", "psnr", "ms_per")  # tags worth keeping


def substitute(value: Any, names: dict[str, str]) -> Any:
    """Fill ``{placeholders}`` in strings (recursively); a whole-placeholder string is re-parsed
    as YAML so ``"{steps}"`` becomes a number."""
    if isinstance(value, str):
        filled = value.format(**names)
        return yaml.safe_load(filled) if value.startswith("{") and value.endswith("}") else filled
    if isinstance(value, list):
        return [substitute(v, names) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, names) for k, v in value.items()}
    return value


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config[a][b][0][c] = value`` for ``key = "a.b.0.c"``, creating dicts on the way."""
    *parents, last = key.split(".")
    node: Any = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def merge(base: Any, overlay: Any) -> Any:
    """``overlay`` layered on ``base`` as a second ``-c`` config is: mappings merge key by key,
    anything else is replaced, and a mapping naming another ``class_path`` replaces the whole
    mapping (its init_args do not inherit the other class's)."""
    other_class = isinstance(overlay, dict) and "class_path" in overlay
    if other_class and isinstance(base, dict) and base.get("class_path") != overlay["class_path"]:
        return overlay
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in overlay.items()}}
    return overlay


def base_config(base: str | list[str]) -> dict[str, Any]:
    """The job's base: one YAML, or several layered in order."""
    config: dict[str, Any] = {}
    for path in [base] if isinstance(base, str) else base:
        config = merge(config, yaml.safe_load((ROOT / path).read_text()) or {})
    return config


def job_config(job: dict[str, Any], names: dict[str, str]) -> Path:
    """Write the job's patched config to runs/sweep/<name>/config.yaml and return its path."""
    config = base_config(job["base"])
    for key, value in (job.get("patches") or {}).items():
        set_dotted(config, key, substitute(value, names))
    folder = RUN_ROOT / job["name"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def scalar_curves(folder: Path, keep: tuple[str, ...]) -> dict[str, list[list[float]]]:
    """Scalars whose tag contains one of ``keep`` from every TensorBoard file under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[list[float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if any(k in tag for k in keep):
                points = [[e.step, round(e.value, 4)] for e in acc.Scalars(tag)]
                curves.setdefault(tag, []).extend(points)
    return curves


def run_job(job: dict[str, Any], variables: dict[str, str], log_dir: Path) -> dict[str, Any]:
    """Run one job as a subprocess (one CPU thread); its wall time, return code and curves."""
    names = {**variables, "name": job["name"]}
    config = job_config(job, names)
    command = [sys.executable, "-m", "fewstep.cli", job["command"], "-c", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    with open(log_dir / f"{job['name']}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    result = {"returncode": code, "seconds": round(time.time() - start, 1)}
    if job["command"] == "fit":
        result["curves"] = scalar_curves(RUN_ROOT / job["name"], CURVES)
    return result


def schedule(plan: dict[str, Any], variables: dict[str, str], jobs: int, out: Path) -> None:
    """Start each job once the jobs it waits for have succeeded; write results as they come."""
    log_dir = out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = {job["name"]: job for job in plan["jobs"]}
    results: dict[str, Any] = {}
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for name, job in list(pending.items()):
                needs = job.get("after", [])
                if any(n in results and results[n].get("returncode") != 0 for n in needs):
                    results[name] = {"skipped": f"a job it waits for failed: {needs}"}
                    del pending[name]
                elif all(n in results for n in needs) and len(running) < jobs:
                    running[pool.submit(run_job, job, variables, log_dir)] = name
                    del pending[name]
                    print(f"[sweep] start {name}", flush=True)
            if not running:  # what is left waits for jobs that are not in the plan
                for name in pending:
                    results[name] = {"skipped": "waits for a job that is not in the plan"}
                out.write_text(json.dumps(results, indent=1))
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                results[name] = future.result()
                print(f"[sweep] done {name}: {json.dumps(results[name])[:400]}", flush=True)
                out.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Parse the plan and ``--var`` overrides, then run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--jobs", type=int, default=4, help="jobs running at once")
    parser.add_argument("--out", type=Path, default=RUN_ROOT / "results.json")
    parser.add_argument("--var", action="append", default=[], help="name=value")
    parser.add_argument("--only", default="", help="comma-separated job names")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="only gather the curves logged so far (e.g. after a timeout)",
    )
    args = parser.parse_args(argv)
    plan = yaml.safe_load(args.plan.read_text())
    variables = {k: "null" if v is None else str(v) for k, v in (plan.get("vars") or {}).items()}
    variables.update(dict(item.split("=", 1) for item in args.var))
    if args.only:
        plan["jobs"] = [j for j in plan["jobs"] if j["name"] in args.only.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.collect:
        curves = {j["name"]: scalar_curves(RUN_ROOT / j["name"], CURVES) for j in plan["jobs"]}
        args.out.write_text(json.dumps(curves, indent=1))
    else:
        schedule(plan, variables, args.jobs, args.out)


if __name__ == "__main__":
    main()
