"""Image encoders built from MONAI networks; each maps (N, C, *spatial) to features (N, F)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ImageConfig


class ImageEncoder(nn.Module):
    """A MONAI backbone with its classification layer removed; ``forward`` returns pooled features."""

    def __init__(self, config: ImageConfig):
        super().__init__()
        self.config = config
        builders = {"resnet": _resnet, "vit": _vit, "densenet": _densenet}
        self.backbone, self.num_features = builders[config.arch](config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.arch == "vit":
            tokens, _ = self.backbone(images)
            return tokens.mean(dim=1)
        if self.config.arch == "densenet":
            features = self.backbone.features(images)
            return torch.flatten(self.backbone.class_layers[:-1](features), 1)
        return self.backbone(images)


def _resnet(config: ImageConfig) -> tuple[nn.Module, int]:
    from monai.networks.nets import ResNet

    net = ResNet(
        block="basic",
        layers=list(config.layers),
        block_inplanes=list(config.widths),
        spatial_dims=config.spatial_dims,
        n_input_channels=config.in_channels,
        conv1_t_size=config.stem_kernel,
        conv1_t_stride=config.stem_stride,
        no_max_pool=config.no_max_pool,
        feed_forward=False,  # return the pooled features, no fc layer
    )
    return net, config.widths[-1]


def _vit(config: ImageConfig) -> tuple[nn.Module, int]:
    from monai.networks.nets import ViT

    net = ViT(
        in_channels=config.in_channels,
        img_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        mlp_dim=config.hidden_size * 4,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        spatial_dims=config.spatial_dims,
        classification=False,
    )
    return net, config.hidden_size


def _densenet(config: ImageConfig) -> tuple[nn.Module, int]:
    from monai.networks.nets import DenseNet

    net = DenseNet(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=1,  # the final linear layer is skipped in forward
        init_features=config.widths[0],
        growth_rate=config.growth_rate,
        block_config=tuple(config.block_config),
    )
    return net, net.class_layers.out.in_features
