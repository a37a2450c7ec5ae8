#!/usr/bin/env bash
# Prepare what bench/gpu_reference_teacher.sh carries to a lent GPU machine (run here, once):
#   .whl  the pure-Python wheels its image lacks (diffusers, jsonargparse and their needs);
#   .gpu  the shipped reference VAE (fewstep/assets/reference_vae) and the packaged MiniLM with float16 weights
#         (44 MB instead of 88: the whole carry must stay under 64 MiB; embeddings differ from
#         float32 by ~8e-4 relative, the float16 cache's own rounding).
# Both folders are git-ignored through .git/info/exclude. Then: device run
#   `bash bench/gpu_reference_teacher.sh 520` with carry [".whl", ".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for d in /.whl/ /.gpu/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude; done
mkdir -p .whl .gpu/minilm
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 jsonargparse==4.53.0 \
  docstring-parser==0.18.0 typeshed-client==2.15.0 importlib-metadata==10.2.0 lazy-importer==0.1.0
rm -rf .gpu/vae && cp -r fewstep/assets/reference_vae .gpu/vae
"$PY" - <<'PY'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from fewstep.models.text_encoder import default_text_encoder_path

src, dst = Path(default_text_encoder_path()), Path(".gpu/minilm")
for path in src.iterdir():
    if path.is_dir():
        shutil.copytree(path, dst / path.name, dirs_exist_ok=True)
    elif path.name != "model.safetensors":
        shutil.copy(path, dst / path.name)
weights = load_file(src / "model.safetensors")
half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
save_file(half, dst / "model.safetensors", metadata={"format": "pt"})
PY
du -sh .whl .gpu
