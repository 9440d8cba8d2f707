"""`tds.codec`, kept for the names in DESIGN.md: the codec is `tds.wire.codec`.

An alias, not a copy: `tds.codec is tds.wire.codec`.
"""

import sys

from tf_dpsparse.wire import codec as _codec

sys.modules[__name__] = _codec
