"""`tds.codec`: the sparse wire format (implemented in `tf_dpsparse.core.codec`)."""

from tf_dpsparse.core.codec import DecodeError
from tf_dpsparse.core.codec import decode
from tf_dpsparse.core.codec import dense_nbytes
from tf_dpsparse.core.codec import encode
from tf_dpsparse.core.codec import encoded_nbytes
from tf_dpsparse.core.codec import entropy_bound_bits

__all__ = ['DecodeError', 'decode', 'dense_nbytes', 'encode', 'encoded_nbytes',
           'entropy_bound_bits']
