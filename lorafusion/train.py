"""`python -m lorafusion.train CONFIG.yaml [--resume]`: the same as `lorafusion train` (the entry
point torchrun launches)."""

import argparse
import sys

from lorafusion.commands import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafusion.train", description=train.__doc__)
    train.add_arguments(parser)
    return train.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
