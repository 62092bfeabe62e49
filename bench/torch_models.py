"""PyTorch eager twins of models/ (same layer shapes and parameter counts), the peer of bench_step.

Bench-only: needs bench/requirements.txt (torch CPU). Layouts follow models/:
ResNet v1.5 bottlenecks (stride on the 3x3), CIFAR BasicBlock ResNets with a
projection shortcut where the shape changes, AlexNet-BN with BatchNorm after
every (bias-free) convolution.
"""

import torch
from torch import nn


def _conv_bn(cin, cout, kernel, stride=1, padding=None):
    padding = kernel // 2 if padding is None else padding
    return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout)]


class Block(nn.Module):
    """Bottleneck (1x1, 3x3 strided, 1x1 x4) or basic (3x3, 3x3) residual block."""

    def __init__(self, cin, features, stride, bottleneck):
        super().__init__()
        cout = features * 4 if bottleneck else features
        if bottleneck:
            layers = [*_conv_bn(cin, features, 1), nn.ReLU(inplace=True), *_conv_bn(features, features, 3, stride),
                      nn.ReLU(inplace=True), *_conv_bn(features, cout, 1)]  # fmt: skip
        else:
            layers = [*_conv_bn(cin, features, 3, stride), nn.ReLU(inplace=True), *_conv_bn(features, features, 3)]
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, stage_sizes, bottleneck, num_classes, width, imagenet_stem):
        super().__init__()
        if imagenet_stem:
            stem = [*_conv_bn(3, width, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [*_conv_bn(3, width, 3), nn.ReLU(inplace=True)]
        blocks, cin = [], width
        for stage, size in enumerate(stage_sizes):
            for b in range(size):
                features = width * 2**stage
                blocks.append(Block(cin, features, 2 if stage > 0 and b == 0 else 1, bottleneck))
                cin = features * 4 if bottleneck else features
        self.features = nn.Sequential(*stem, *blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class AlexNetBN(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        convs = [(3, 96, 11, 4, 0, True), (96, 256, 5, 1, 2, True), (256, 384, 3, 1, 1, False),
                 (384, 384, 3, 1, 1, False), (384, 256, 3, 1, 1, True)]  # fmt: skip
        layers = []
        for cin, cout, kernel, stride, padding, pool in convs:
            layers += [*_conv_bn(cin, cout, kernel, stride, padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(3, 2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def create(name: str, num_classes: int, width: int | None = None) -> nn.Module:
    """The twin of models.create(name); width for the CIFAR ResNet."""
    if name == "resnet50":
        return ResNet((3, 4, 6, 3), True, num_classes, 64, imagenet_stem=True)
    if name == "alexnet_bn":
        return AlexNetBN(num_classes)
    if name == "cifar_resnet20":
        return ResNet((3, 3, 3), False, num_classes, width or 16, imagenet_stem=False)
    raise ValueError(f"No PyTorch twin of {name!r}.")


class LARS(torch.optim.Optimizer):
    """LARS (paper form) with momentum and weight decay, BN/bias excluded, with
    foreach kernels: the peer of lars.lars for the step timing."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            layers = [p for p in params if p.ndim > 1]
            others = [p for p in params if p.ndim <= 1]
            grads = [p.grad for p in layers]
            w_norms = torch._foreach_norm(layers)
            g_norms = torch._foreach_norm(grads)
            ratios = [group["eta"] * w / (g + group["weight_decay"] * w) for w, g in zip(w_norms, g_norms)]
            updates = list(torch._foreach_add(grads, layers, alpha=group["weight_decay"]))
            torch._foreach_mul_(updates, ratios)
            updates += [p.grad for p in others]
            for p, u in zip(layers + others, updates):
                buf = self.state[p].get("momentum")
                if buf is None:
                    buf = self.state[p]["momentum"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(u, alpha=group["lr"])
                p.sub_(buf)
