"""Moved: the paper table is `tf_dpsparse.baselines.paper_table`, so that
`tf-dpsparse bench` runs from any install; this keeps the old path working."""

import sys

from tf_dpsparse.baselines.paper_table import main  # noqa: F401

if __name__ == '__main__':
  sys.exit(main())
