"""``compile: true``: the model runs through ``torch.compile`` with the regularisers' hooks traced
into its graph, and trains as the eager model does. CPU, backend ``aot_eager`` (dynamo and
AOTAutograd trace forward and backward exactly as with inductor, without generating code)."""

import csv

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils.data import TensorDataset

from spatial_entropy.attention import unwrap_model
from spatial_entropy.config import load_config
from spatial_entropy.engine import train
from spatial_entropy.models import compile_model
from spatial_entropy.regularizers import DRLocRegularizer, SpatialEntropyRegularizer

BACKEND = "aot_eager"


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
        num_classes=3,
    )  # fmt: skip


def test_compile_mode_reaches_torch_compile_and_needs_inductor(monkeypatch):
    seen = []

    def fake_compile(model, **kwargs):
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _tiny_vit()
    compile_model(model, "inductor", "reduce-overhead")
    compile_model(model, "inductor")
    assert seen == [{"backend": "inductor", "mode": "reduce-overhead"},
                    {"backend": "inductor", "mode": None}]  # fmt: skip
    with pytest.raises(ValueError, match="needs the inductor backend"):
        compile_model(model, BACKEND, "reduce-overhead")
    assert load_config(values={"compile_mode": "reduce-overhead"}).compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="compile_mode"):
        load_config(values={"compile_mode": "fastest"})
    with pytest.raises(ValueError, match="needs compile_backend 'inductor'"):
        load_config(values={"compile_mode": "max-autotune", "compile_backend": BACKEND})


def test_unwrap_model_sees_through_compile():
    model = _tiny_vit()
    compiled = compile_model(model, BACKEND)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    assert unwrap_model(compiled) is model
    assert list(unwrap_model(compiled).state_dict()) == list(_tiny_vit().state_dict())


def _step(model, se_reg, drloc_reg, images, labels):
    """The losses and gradients of one step: of the SE term alone on the last qkv, and of the
    total loss on every parameter of the model and of DRLoc's head."""
    task = F.cross_entropy(model(images), labels)
    se, drloc = se_reg(), drloc_reg()
    qkv = unwrap_model(model).blocks[-1].attn.qkv.weight
    (se_grad,) = torch.autograd.grad(se, qkv, retain_graph=True)
    (task + se + drloc).backward()
    named = [*unwrap_model(model).named_parameters(), *drloc_reg.module.named_parameters("drloc")]
    losses = torch.stack([task, se_reg.stats()["se"], drloc]).detach()
    return losses, se_grad, {name: p.grad for name, p in named}


@pytest.mark.slow  # the first compile in a process: about 10 s
def test_compiled_model_gives_the_eager_losses_and_gradients():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])
    results = []
    for compiled in (False, True):
        model = _tiny_vit()
        se_reg, drloc_reg = SpatialEntropyRegularizer(0.5, "constant"), DRLocRegularizer(0.1, 8, 16)
        for reg in (se_reg, drloc_reg):
            reg.attach(model)  # DRLoc's head: same seed, same initial weights in both arms
            reg.set_progress(0.0, 1.0)
        if compiled:  # hooks first, then compile: what the engine does
            counter = CompileCounterWithBackend(BACKEND)
            model = torch.compile(model, backend=counter)
        results.append(_step(model, se_reg, drloc_reg, images, labels))
    # one graph: dynamo traced through the three hooks instead of breaking at them
    assert counter.frame_count == 1
    (losses, se_grad, grads), (losses_c, se_grad_c, grads_c) = results
    torch.testing.assert_close(losses_c, losses)
    assert (losses > 0).all() and se_grad.abs().sum() > 0  # the SE term trains q/k
    torch.testing.assert_close(se_grad_c, se_grad)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], msg=name)


class _Images(TensorDataset):
    num_classes, in_chans = 3, 1


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_either_way(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = _Images(torch.randn(8, 1, 16, 16, generator=generator), torch.arange(8) % 3)
    vit = dict(model="se_vit_tiny_patch4_32", img_size=16,
               model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    recipe = dict(epochs=3, batch_size=4, num_workers=0, warmup_epochs=1, model_ema=True,
                  model_ema_decay=0.5, se={"weight": 0.1, "schedule": "constant"})  # fmt: skip

    def run(run_dir, resume=False, **values):
        config = load_config(values=vit | recipe | {"compile_backend": BACKEND} | values)
        return train(config, run_dir, resume=resume, datasets=(data, data))

    eager = run(tmp_path / "eager")
    # compiled for 2 steps, eager for 2, compiled to the end: checkpoints of either load in both
    mixed = tmp_path / "mixed"
    graphs = counters["stats"]["unique_graphs"]
    run(mixed, compile=True, max_steps=2)
    assert counters["stats"]["unique_graphs"] > graphs, "the model did not run compiled"
    assert load_file(mixed / "checkpoints" / "step_00000002.safetensors").keys() == (
        load_file(tmp_path / "eager" / "model.safetensors").keys()
    )
    run(mixed, resume=True, max_steps=4)
    assert (mixed / "checkpoints" / "step_00000004.pt").exists()
    compiled = run(mixed, resume=True, compile=True)

    def log(run_dir):
        with open(run_dir / "log.csv", newline="") as f:
            return [(float(r["train_loss"]), float(r["train_se"])) for r in csv.DictReader(f)]

    assert len(log(mixed)) == 3
    torch.testing.assert_close(log(mixed), log(tmp_path / "eager"), rtol=1e-5, atol=1e-6)
    for key in ("top1", "loss", "se_mean", "train_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key
    for weights in ("model.safetensors", "model_ema.safetensors"):
        expected = load_file(tmp_path / "eager" / weights)
        torch.testing.assert_close(load_file(mixed / weights), expected, rtol=1e-5, atol=1e-6)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown torch.compile backend 'indcutor'.*'inductor'"):
        compile_model(_tiny_vit(), "indcutor")


def test_torch_without_compile_support_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(RuntimeError, match="compile: true needs torch.compile.*compile: false"):
        compile_model(_tiny_vit(), BACKEND)


def test_compile_key_must_be_a_bool():
    with pytest.raises(ValueError, match="config key 'compile' expects bool, got 'yes'"):
        load_config(values={"compile": "yes"})
    assert load_config(values={"compile": True}).compile is True
