"""Reference Equinox models with SCICO's architectures, channels-last.

Each model takes one example `(height, width, channels)` and an
`eqx.nn.State` and returns `(y, state)`; build one with
`eqx.nn.make_with_state(DnCNN)(depth=..., channels=..., key=...)`, or load
SCICO's pretrained DnCNN denoisers with `load_scico_dncnn("6M")`.
"""

from ._blocks import (
    ConvBNBlock as ConvBNBlock,
    ConvBNMultiBlock as ConvBNMultiBlock,
    ConvBNPoolBlock as ConvBNPoolBlock,
    ConvBNUpsampleBlock as ConvBNUpsampleBlock,
)
from ._convbn import ConvBNNet as ConvBNNet, ResNet as ResNet
from ._dncnn import DnCNN as DnCNN
from ._init import (
    glorot_normal as glorot_normal,
    he_normal as he_normal,
    lecun_normal as lecun_normal,
)
from ._layers import (
    ChannelsLastBatchNorm as ChannelsLastBatchNorm,
    ChannelsLastConv2d as ChannelsLastConv2d,
    max_pool as max_pool,
    upscale_nn as upscale_nn,
)
from ._modl import MoDLNet as MoDLNet
from ._odp import ODPBlock as ODPBlock, ODPNet as ODPNet
from ._scico import (
    load_scico_dncnn as load_scico_dncnn,
    SCICO_DNCNN_VARIANTS as SCICO_DNCNN_VARIANTS,
)
from ._scico_vars import from_scico_variables as from_scico_variables
from ._unet import UNet as UNet
