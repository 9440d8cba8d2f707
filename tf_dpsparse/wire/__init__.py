"""`tds.wire`: the wire format in one place, for devices and servers alike.

- value formats (`formats`): 32-bit floats, float16 and int8 blocks, rounded
  toward zero so a clipped update stays within its clip;
- the codec (`codec`): sparse payloads near the entropy bound, a `decode`
  that trusts nothing, and exact byte counts inside TensorFlow graphs;
- downloads (`downloads`): what a device does with a broadcast or a
  catch-up, and what they cost.

No TFF and no Keras: a device or a deployment server imports only this.
"""

from tf_dpsparse.wire import codec
from tf_dpsparse.wire import downloads
from tf_dpsparse.wire import formats
from tf_dpsparse.wire.codec import DecodeError
from tf_dpsparse.wire.codec import decode
from tf_dpsparse.wire.codec import dense_nbytes
from tf_dpsparse.wire.codec import encode
from tf_dpsparse.wire.codec import encoded_nbytes
from tf_dpsparse.wire.codec import entropy_bound_bits
from tf_dpsparse.wire.codec import index_nbytes
from tf_dpsparse.wire.codec import values_nbytes
from tf_dpsparse.wire.downloads import apply_broadcast
from tf_dpsparse.wire.downloads import apply_catch_up
from tf_dpsparse.wire.downloads import catch_up_nbytes
from tf_dpsparse.wire.downloads import catch_up_payload
from tf_dpsparse.wire.formats import VALUE_BITS
from tf_dpsparse.wire.formats import int8_block
from tf_dpsparse.wire.formats import to_wire_precision

__all__ = [
    'DecodeError', 'VALUE_BITS', 'apply_broadcast', 'apply_catch_up',
    'catch_up_nbytes', 'catch_up_payload', 'codec', 'decode', 'dense_nbytes',
    'downloads', 'encode', 'encoded_nbytes', 'entropy_bound_bits', 'formats',
    'index_nbytes', 'int8_block', 'to_wire_precision', 'values_nbytes'
]
