#!/usr/bin/env python3
"""Regenerate configs/encode/base.yaml from EncodeConfig: every option with its default and help."""

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_encode.config import fields_help  # noqa: E402

lines = ["# wds-encode options (every one of `wds-encode run --help`), with their defaults.",
         "# Use with `wds-encode run --config configs/encode/base.yaml`; flags on the command line override.",
         "# Regenerate with: python scripts/write_base_config.py", ""]
for name, (default, description) in fields_help().items():
    lines.append(f"# {description}")
    lines.append(yaml.safe_dump({name: default}, default_flow_style=False).strip())
out = Path(__file__).resolve().parents[1] / "configs" / "encode" / "base.yaml"
out.write_text("\n".join(lines) + "\n")
print(f"wrote {out}")
