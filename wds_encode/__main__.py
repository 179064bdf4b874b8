"""`python -m wds_encode ...` is the `wds-encode` command (torchrun: `torchrun ... -m wds_encode run ...`)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="wds-encode")
