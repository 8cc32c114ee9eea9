"""timm layer support: ``Conv2dSame`` (TF "SAME" padding, used by ``tf_*`` EfficientNets) gets a quantized twin.

The module itself is :mod:`hf_adaquant.nn.qconv_same` (serialization packs it, so it sits below serialization);
this import registers it and keeps the ``hf_adaquant.integrations.timm.QConv2dSame`` path.
"""

from __future__ import annotations

from ..nn.qconv_same import QConv2dSame

__all__ = ["QConv2dSame"]
