"""`evaluate --attention` end to end on a miniature VOC 2012: per-class objects, void ignored."""

import json

import torch

from spatial_entropy.checkpoint import save_weights
from spatial_entropy.cli import main
from spatial_entropy.config import load_config, save_config
from spatial_entropy.data import build_dataset
from spatial_entropy.models import create_model


def test_uniform_attention_gives_each_objects_share_of_the_valid_pixels(voc_dir, tmp_path):
    # Zero q/k weights make every [CLS] attention map uniform: all patches tie, so the 60%-mass
    # mask keeps the whole image and each object's Jaccard is |object| / |non-void pixels|.
    config = load_config(
        values={
            "model": "se_vit_tiny_patch4_32",
            "model_kwargs": {"depth": 1, "embed_dim": 24},
            "dataset": "voc2012",
            "data_path": str(voc_dir),
            "img_size": 32,
            "batch_size": 2,
            "num_workers": 0,
        }
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    model = create_model(config.model, num_classes=20, img_size=32, **config.model_kwargs)
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight[: 2 * 24].zero_()
        model.blocks[-1].attn.qkv.bias[: 2 * 24].zero_()
    save_weights(model, run_dir / "model.safetensors")

    assert main(["evaluate", str(run_dir), "--split", "val", "--attention"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())

    expected = []
    for _, _, mask in build_dataset(
        "voc2012", "val", data_path=voc_dir, img_size=32, with_masks=True
    ):
        valid = mask != 255
        objects = [c for c in mask.unique().tolist() if c not in (0, 255)]
        scores = [((mask == c) & valid).sum().item() / valid.sum().item() for c in objects]
        expected.append(sum(scores) / len(scores))
    assert len(expected) == 2
    assert abs(result["jaccard"] - sum(expected) / len(expected)) < 1e-6
