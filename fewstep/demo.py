"""`make demo`: run every pipeline stage that exists, reusing finished stages."""

from __future__ import annotations

import json
from pathlib import Path

from fewstep.tools.shapes_preview import preview

RUN_DIR = Path("runs/demo")


def main() -> None:
    """Render and score the shapes world; later stages are added as they land."""
    print("[1/1] shapes world: rendering a captioned sample grid and scoring renders ...")
    scores = preview(out=str(RUN_DIR / "shapes"), resolution=64)
    print(json.dumps(scores, indent=2))
    print(f"wrote {RUN_DIR / 'shapes' / 'grid.png'} (captioned samples),")
    print(f"      {RUN_DIR / 'shapes' / 'images'} (image-caption folder with metadata.jsonl),")
    print(f"      {RUN_DIR / 'shapes' / 'scores.json'} (GenEval-protocol scorer on renders)")


if __name__ == "__main__":
    main()
