"""A teacher's GenEval-protocol score at several CFG scales, one ``fewstep validate`` per scale
on the same prompts and noise (the fit config's validation set), into one markdown table. Each
run logs to a CSV under ``--out`` (so nothing lands in the working directory); the table, with
n and the standard error of the overall score, is printed and written to ``--out``/table.md.

    python bench/guidance_sweep.py CKPT --scales 1 1.5 2 3 [--out DIR] -- -c A.yaml -c B.yaml
        [other `fewstep validate` arguments]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from math import nan
from pathlib import Path

from fewstep.data.prompts import CATEGORIES

OVERALL, SE = "val/geneval/overall", "val/geneval/overall_se"


def validate(ckpt: str, scale: float, out: Path, config_args: list[str]) -> dict[str, float]:
    """Run ``fewstep validate`` at one scale; its last logged validation metrics."""
    folder = out / f"cfg_{scale:g}"
    command = [
        str(Path(sys.executable).with_name("fewstep")), "validate", *config_args,
        "--ckpt_path", ckpt, f"--model.init_args.guidance_scale={scale}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={folder}", "--trainer.logger.init_args.name=",
    ]  # fmt: skip
    subprocess.run(command, check=True)  # from the repository root: the configs' paths
    rows = [r for f in sorted(folder.rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    metrics = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    if OVERALL not in metrics:
        raise SystemExit(f"{folder}: the validation logged no val/geneval/overall")
    return metrics


def table(results: dict[float, dict[str, float]], n: int) -> str:
    """Markdown: one row per scale, overall ± SE (n prompts) and each category in %."""
    head = f"| CFG | overall (n = {n}) | " + " | ".join(CATEGORIES) + " |"
    lines = [head, "|" + "---|" * (2 + len(CATEGORIES))]
    for scale, m in results.items():
        overall = f"{100 * m[OVERALL]:.1f} % ± {100 * m[SE]:.1f}"
        cats = " | ".join(f"{100 * m.get(f'val/geneval/{c}', nan):.0f}" for c in CATEGORIES)
        lines.append(f"| {scale:g} | {overall} | {cats} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--out", type=Path, default=Path("runs/guidance_sweep"))
    parser.add_argument("--n", type=int, default=512, help="validation prompts (for the table)")
    args, config_args = parser.parse_known_args()
    config_args = [a for a in config_args if a != "--"]
    out = args.out.resolve()
    results = {s: validate(args.ckpt, s, out, config_args) for s in args.scales}
    text = table(results, args.n)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
