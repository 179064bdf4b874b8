#!/usr/bin/env python
"""Regenerate the bundled demo model's config, and the seeded initial weights it was trained from.

Usage:
  python scripts/make_demo_model.py [--check]          # write / check wds_encode/assets/demo_model_config.json
  python scripts/make_demo_model.py --init-out FILE    # also write the seeded (untrained) weights to FILE
The bundled wds_encode/assets/demo_model.safetensors is those initial weights trained by
scripts/train_demo_model.py (a few minutes on one GPU); see that script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_encode.models import demo_model_paths  # noqa: E402
from wds_encode.models.demo_model import DEMO_MODEL_CONFIG, demo_state_dict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the bundled config is out of date")
    parser.add_argument("--init-out", type=Path, default=None, help="write the seeded initial weights here")
    args = parser.parse_args(argv)
    config_path, _ = demo_model_paths()
    text = json.dumps(DEMO_MODEL_CONFIG, indent=1) + "\n"
    if args.check:
        if not config_path.exists() or config_path.read_text(encoding="utf-8") != text:
            print(f"out of date: {config_path}; run python scripts/make_demo_model.py", file=sys.stderr)
            return 1
        print("demo model config is up to date")
        return 0
    config_path.write_text(text, encoding="utf-8")
    print(f"wrote {config_path}")
    if args.init_out is not None:
        from safetensors.torch import save_file
        save_file(demo_state_dict(), str(args.init_out), metadata={"format": "pt"})
        print(f"wrote {args.init_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
