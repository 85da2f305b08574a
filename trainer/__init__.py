"""HY-WU trainer: `python -m trainer.train --help` (docs/train.md)."""
