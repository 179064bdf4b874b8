#!/usr/bin/env python
"""Regenerate the bundled demo model: wds_encode/assets/demo_model_config.json + .safetensors.

Usage: python scripts/make_demo_model.py [--check]
  --check  do not write; exit 1 if the bundled files differ from what would be generated.
The weights are seeded, so regeneration is deterministic (see wds_encode/models/demo_model.py).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_encode.models import demo_model_paths  # noqa: E402
from wds_encode.models.demo_model import write_demo_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="verify the bundled files are up to date instead of writing them")
    args = parser.parse_args(argv)
    config_path, ckpt_path = demo_model_paths()
    if not args.check:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        write_demo_model(config_path, ckpt_path)
        print(f"wrote {config_path} and {ckpt_path} ({ckpt_path.stat().st_size} bytes)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        new_cfg, new_ckpt = Path(tmp) / config_path.name, Path(tmp) / ckpt_path.name
        write_demo_model(new_cfg, new_ckpt)
        stale = [str(p) for p, q in ((config_path, new_cfg), (ckpt_path, new_ckpt))
                 if not p.exists() or not filecmp.cmp(p, q, shallow=False)]
    if stale:
        print(f"out of date: {stale}; run python scripts/make_demo_model.py", file=sys.stderr)
        return 1
    print("demo model files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
