"""Train a small ViT and a small Swin, built from vitkern modules, on scikit-learn's digits.

The data set is the 8x8 handwritten digits that ship inside scikit-learn (1797 images, 10
classes; nothing is downloaded). Images are upsampled to 16x16, so the ViT sees a 4x4 grid of
4x4-pixel patches and the Swin an 8x8 grid of 2x2-pixel patches in 4x4 windows (shifted by 2 in
every second block), merged to 4x4 for its second stage.

    python examples/train_digits.py                  # both models, 20 epochs each
    python examples/train_digits.py --model swin --epochs 10
    python examples/train_digits.py --unpatched      # the same timm models without vitkern

Each epoch prints the mean training loss and the test accuracy. The functions are importable
(tests/test_training.py runs a short version).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Small configurations of timm's ViT and Swin for 16x16 single-channel images.
MODEL_CONFIGS: Dict[str, dict] = {
    "vit": dict(name="vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, global_pool="avg"),
    "swin": dict(name="swin_tiny_patch4_window7_224", img_size=16, patch_size=2, in_chans=1,
                 num_classes=10, window_size=4, embed_dim=64, depths=(2, 2), num_heads=(2, 4),
                 mlp_ratio=2.0),
}


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_tensors(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """sklearn's digits as ``(N, 1, size, size)`` float32 (standardized) and int64 labels, split
    into train and test with a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])


def build_model(kind: str, patched: bool = True, seed: int = 0) -> nn.Module:
    """The small ``kind`` ("vit" or "swin") model. ``patched=True`` builds it through
    ``vitkern.models`` (all attention in vitkern modules); ``patched=False`` is the plain timm
    model. Both draw the same initial weights for the same ``seed``."""
    cfg = dict(MODEL_CONFIGS[kind])
    name = cfg.pop("name")
    torch.manual_seed(seed)
    if patched:
        import vitkern.models
        return vitkern.models.create_model(name, **cfg)
    import timm
    return timm.create_model(name, pretrained=False, **cfg)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(y)


@dataclass
class History:
    step_losses: List[float] = field(default_factory=list)
    epoch_losses: List[float] = field(default_factory=list)
    test_accuracy: List[float] = field(default_factory=list)
    seconds: float = 0.0


def train(model: nn.Module, data: Digits, epochs: int = 20, batch_size: int = 64, lr: float = 3e-3,
          weight_decay: float = 0.05, seed: int = 0, max_steps: Optional[int] = None,
          log: Optional[Callable[[str], None]] = print, evaluate: bool = True) -> History:
    """AdamW with a linear warm-up (one epoch) and cosine decay. The batch order and the random
    draws of stochastic depth come from ``seed`` alone, so two models trained with the same seed
    see the same batches and drop the same paths."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, max(1, total // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    order_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hist = History()
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data.y_train), generator=order_gen)
        running, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            if step >= total:
                break
            idx = order[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist.step_losses.append(loss.item())
            running += loss.item() * len(idx)
            seen += len(idx)
            step += 1
        if seen == 0:
            break
        hist.epoch_losses.append(running / seen)
        acc = accuracy(model, data.x_test, data.y_test) if evaluate else float("nan")
        hist.test_accuracy.append(acc)
        if log is not None:
            log(f"  epoch {epoch + 1:3d}  loss {hist.epoch_losses[-1]:.4f}  test acc {acc:.4f}  "
                f"({time.perf_counter() - start:.1f} s)")
    hist.seconds = time.perf_counter() - start
    return hist


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("vit", "swin", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--unpatched", action="store_true", help="train the plain timm models instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_digits_tensors(seed=args.seed)
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images, "
          f"{data.x_train.shape[-1]}x{data.x_train.shape[-1]}")
    kinds = ("vit", "swin") if args.model == "both" else (args.model,)
    for kind in kinds:
        model = build_model(kind, patched=not args.unpatched, seed=args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{kind} ({'timm' if args.unpatched else 'vitkern'} modules, {n_params / 1e3:.0f}k parameters)")
        hist = train(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        print(f"{kind}: final test accuracy {hist.test_accuracy[-1]:.4f} after {hist.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
