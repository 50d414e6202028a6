"""A short real training run (examples/train_digits.py) with vitkern modules.

- The small ViT and Swin built from vitkern modules learn scikit-learn's digits (10 classes):
  test accuracy well above chance after a few epochs.
- Patched and unpatched models, same initial weights and batch order, fp32: the per-step losses
  agree to ~1e-4 relative over the first steps (so the fused backward drives the same training).
Budget: under a minute on one core.
"""
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(example):
    return example.load_digits_tensors(seed=0)


def _only_vitkern_attention(model) -> bool:
    names = [type(m).__module__ for m in model.modules()]
    return any(n.startswith("vitkern.nn") for n in names) and not any(
        type(m).__name__ in ("Attention", "SwinTransformerBlock", "WindowAttention")
        and type(m).__module__.startswith("timm") for m in model.modules())


@pytest.mark.parametrize("kind,epochs,min_acc", [("vit", 4, 0.5), ("swin", 4, 0.35)])
def test_vitkern_models_learn_digits(example, digits, kind, epochs, min_acc):
    model = example.build_model(kind, patched=True, seed=0)
    assert _only_vitkern_attention(model)
    hist = example.train(model, digits, epochs=epochs, seed=0, log=None)
    assert len(hist.epoch_losses) == epochs
    assert hist.epoch_losses[-1] < 0.8 * hist.epoch_losses[0]
    # chance is 0.1
    assert hist.test_accuracy[-1] >= min_acc, hist.test_accuracy


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_patched_loss_curve_matches_unpatched(example, digits, kind):
    plain = example.build_model(kind, patched=False, seed=3)
    fused = example.build_model(kind, patched=True, seed=3)
    for (name, a), (_, b) in zip(plain.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name                     # the same initial weights
    steps = 6
    ref = example.train(plain, digits, epochs=1, seed=5, max_steps=steps, log=None, evaluate=False)
    out = example.train(fused, digits, epochs=1, seed=5, max_steps=steps, log=None, evaluate=False)
    assert len(out.step_losses) == steps
    for step, (a, b) in enumerate(zip(out.step_losses, ref.step_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: patched loss {a} vs unpatched {b}"
    assert ref.step_losses[-1] < ref.step_losses[0]        # the steps did train
