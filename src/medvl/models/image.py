"""Image encoders built from MONAI networks; each maps (N, C, *spatial) to features (N, F).

2D images are (N, C, H, W); volumes (N, C, D, H, W) with axis D inferior -> superior (axial
slices). ``slicepool`` encodes each axial slice with a 2D backbone, at inference at most
``slice_batch`` slices at a time (bounded memory), and pools the slice features with a learned
slice-position embedding and gated attention (Ilse et al. 2018) or a mean: the slice-then-pool
design of Merlin and MedVista3D.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import InputError, ModelError, one_line
from .config import ImageConfig


class ImageTowerError(ModelError):
    """The image settings cannot build the image tower (a MONAI network refuses them): names the image
    settings, so a model folder's loader does not blame its text tower."""


class ImageEncoder(nn.Module):
    """A MONAI backbone with its classification layer removed; ``forward`` returns pooled features."""

    def __init__(self, config: ImageConfig):
        super().__init__()
        self.config = config
        builders = {"resnet": _resnet, "vit": _vit, "densenet": _densenet, "slicepool": _slicepool}
        try:
            self.backbone, self.num_features = builders[config.arch](config)
        except ImageTowerError:
            raise
        except Exception as err:  # MONAI's ValueError / AssertionError for a combination validate() does not check
            raise ImageTowerError(f"the image settings cannot build a {config.arch} image tower "
                                  f"({one_line(err)})") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_input(self.config, images)
        if self.config.arch == "slicepool":
            return self.backbone(images)
        if self.config.arch == "vit":
            tokens, _ = self.backbone(images)
            return tokens.mean(dim=1)
        if self.config.arch == "densenet":
            features = self.backbone.get_submodule("features")(images)
            return torch.flatten(_densenet_head(self.backbone)[:-1](features), 1)
        return self.backbone(images)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Unpooled features (N, T, F): one token per cell of the last feature map, in row-major
        (depth,) height, width order (ResNet, DenseNet), the patch tokens (ViT) or one token per
        axial slice (slicepool). ``forward`` is the mean of these tokens (the attention-pooled
        slices for slicepool); ``token_grid`` gives the token layout for heatmaps."""
        _check_input(self.config, images)
        if self.config.arch == "slicepool":
            if not isinstance(self.backbone, SlicePoolEncoder):
                raise ModelError(f"a slicepool encoder holds a {type(self.backbone).__name__}")
            return self.backbone.slice_tokens(images)
        if self.config.arch == "vit":
            tokens, _ = self.backbone(images)
            return tokens
        if self.config.arch == "densenet":
            features = self.backbone.get_submodule("features")(images)
            activation = _densenet_head(self.backbone)[0]  # the final activation, before pooling
            return torch.flatten(activation(features), 2).transpose(1, 2)
        net = self.backbone
        stages = ["conv1", "bn1", "act", *([] if net.no_max_pool else ["maxpool"]), "layer1", "layer2", "layer3",
                  "layer4"]  # MONAI ResNet.forward up to its average pooling
        x = images
        for stage in stages:
            x = net.get_submodule(stage)(x)
        return torch.flatten(x, 2).transpose(1, 2)

    def token_grid(self, images: torch.Tensor) -> tuple[int, ...]:
        """The spatial shape the tokens of ``images`` were flattened from ((D,) H, W cells; (D,) for slicepool)."""
        with torch.no_grad():
            count = self.tokens(images[:1]).shape[1]
        spatial = images.shape[2:]
        if self.config.arch == "slicepool":
            return (spatial[0],)
        # cells per axis shrink by the same stride on every axis
        stride = round((float(torch.tensor(spatial).prod()) / count) ** (1 / len(spatial)))
        grid = tuple(max(1, -(-side // stride)) for side in spatial)
        if int(torch.tensor(grid).prod()) != count:
            raise ModelError(f"cannot lay {count} image tokens on a grid for input {tuple(spatial)}")
        return grid


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
        img_size=config.volume_shape,
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
    last = _densenet_head(net)[-1]
    if not isinstance(last, nn.Linear):
        raise ModelError(f"MONAI DenseNet ends in a {type(last).__name__}, not the linear layer medvl skips")
    return net, last.in_features


def _densenet_head(net: nn.Module) -> nn.Sequential:
    """MONAI DenseNet's class layers (norm, activation, pooling, flatten, then the linear ``out``)."""
    head = net.get_submodule("class_layers")
    if not isinstance(head, nn.Sequential):
        raise ModelError(f"MONAI DenseNet's class_layers is a {type(head).__name__}, not a Sequential")
    return head


class SlicePoolEncoder(nn.Module):
    """A 2D encoder applied to every axial slice, then pooled across slices (features (N, F))."""

    def __init__(self, config: ImageConfig):
        super().__init__()
        self.slice_batch = config.slice_batch
        self.slice_encoder = ImageEncoder(dataclasses.replace(config, arch=config.slice_arch, spatial_dims=2))
        features = self.slice_encoder.num_features
        self.position = nn.Parameter(torch.zeros(config.volume_shape[0], features))  # slice-level embedding
        self.attention = None
        if config.slice_pool == "attention":
            hidden = max(features // 2, 1)
            self.attention = nn.ModuleList([nn.Linear(features, hidden), nn.Linear(features, hidden),
                                            nn.Linear(hidden, 1)])
        self.num_features = features

    def slice_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """One position-embedded feature per axial slice (N, D, F), before pooling."""
        count, channels, depth = volumes.shape[:3]
        slices = volumes.transpose(1, 2).reshape(count * depth, channels, *volumes.shape[3:])
        # Training encodes every slice of the batch at once: batch-norm statistics over chunks of one
        # volume's slices would differ from the running statistics used at inference.
        step = len(slices) if self.training else self.slice_batch
        features = torch.cat([self.slice_encoder(slices[start:start + step]) for start in range(0, len(slices), step)])
        return features.view(count, depth, -1) + self.position

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        features = self.slice_tokens(volumes)
        if self.attention is None:
            return features.mean(dim=1)
        value, gate, score = self.attention
        weights = score(torch.tanh(value(features)) * torch.sigmoid(gate(features))).softmax(dim=1)
        return (weights * features).sum(dim=1)


def _slicepool(config: ImageConfig) -> tuple[nn.Module, int]:
    encoder = SlicePoolEncoder(config)
    return encoder, encoder.num_features


def _check_input(config: ImageConfig, images: torch.Tensor) -> None:
    """Refuse a batch of the wrong rank, channels or (for size-bound networks) spatial shape."""
    expected = (config.in_channels, *config.volume_shape)
    names = "(N, C, H, W)" if config.spatial_dims == 2 else "(N, C, D, H, W)"
    fixed_size = config.arch in ("vit", "slicepool")
    shape = tuple(images.shape[1:])
    if images.ndim != 2 + config.spatial_dims or shape[0] != expected[0] or (fixed_size and shape != expected):
        raise InputError(f"a {config.spatial_dims}D {config.arch} model takes {names} batches shaped "
                         f"(N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
