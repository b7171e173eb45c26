"""Attention metrics on hand-made attention maps, masks and logits with known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from spatial_entropy.attention import AttentionCapture
from spatial_entropy.evaluation import (
    AttentionStatistics,
    attention_jaccard,
    attention_masks,
    evaluate,
    evaluate_attention,
    jaccard_index,
    map_statistics,
    object_masks,
)
from spatial_entropy.models import create_model

# A 2x2 patch grid over a 4x4 image: patch p covers a 2x2 block of pixels, in raster order.
GRID = (2, 2)


def patch_mask(*patches: int) -> torch.Tensor:
    """(4, 4) boolean pixel mask covering the given patches of GRID."""
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for p in patches:
        r, c = divmod(p, 2)
        mask[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = True
    return mask


def kept(attention: list[float], mass: float = 0.6) -> list[int]:
    """Indices of the patches of one map that attention_masks keeps."""
    masks = attention_masks(torch.tensor([[attention]]), (1, len(attention)), mass=mass)
    return masks.flatten().nonzero().flatten().tolist()


class TestAttentionMasks:
    def test_smallest_top_set_holding_the_mass(self):
        assert kept([0.5, 0.25, 0.125, 0.125]) == [0, 1]  # 0.5 < 0.6 <= 0.75
        assert kept([0.125, 0.5, 0.125, 0.25]) == [1, 3]  # same values, another order

    def test_exact_boundary_counts_as_holding_the_mass(self):
        assert kept([0.5, 0.25, 0.125, 0.125], mass=0.75) == [0, 1]
        assert kept([0.5, 0.25, 0.125, 0.125], mass=0.5) == [0]
        assert kept([0.5, 0.25, 0.125, 0.125], mass=1.0) == [0, 1, 2, 3]

    def test_ties_with_the_last_kept_patch_are_kept(self):
        # The top two reach 0.75 >= 0.6, but patch 2 ties with patch 1 and the order of tied
        # patches is arbitrary, so both are kept.
        assert kept([0.5, 0.25, 0.25, 0.0]) == [0, 1, 2]
        assert kept([0.25, 0.25, 0.25, 0.25]) == [0, 1, 2, 3]

    def test_renormalised_over_the_patches(self):
        # Post-softmax patch attention sums to less than 1 (the [CLS] key takes the rest).
        assert kept([0.25, 0.125, 0.0625, 0.0625]) == [0, 1]

    def test_matches_dino_reference_without_ties(self):
        torch.manual_seed(0)
        attention = torch.rand(3, 4, 35).softmax(-1) * 0.9
        ours = attention_masks(attention, (5, 7), mass=0.6).flatten(-2)
        # DINO's visualize_attention.py: ascending sort, keep where cumulative mass > 1 - mass.
        values, order = torch.sort(attention / attention.sum(-1, keepdim=True), dim=-1)
        dino = (values.cumsum(-1) > 1 - 0.6).gather(-1, order.argsort(-1))
        assert torch.equal(ours, dino)

    def test_nearest_upsampling_to_pixels(self):
        masks = attention_masks(torch.tensor([[[1.0, 0.0]]]), (1, 2), (2, 4))
        assert masks.shape == (1, 1, 2, 4)
        assert masks[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]

    @pytest.mark.parametrize("mass", [0.0, -0.1, 1.5])
    def test_rejects_mass_outside_unit_interval(self, mass):
        with pytest.raises(ValueError, match="mass"):
            attention_masks(torch.ones(1, 1, 4), GRID, mass=mass)

    def test_rejects_bad_shapes_and_values(self):
        with pytest.raises(ValueError, match=r"N = gh \* gw = 4"):
            attention_masks(torch.ones(1, 1, 5), GRID)
        with pytest.raises(ValueError, match="rank 3"):
            attention_masks(torch.ones(1, 4), GRID)
        with pytest.raises(ValueError, match="non-negative"):
            attention_masks(torch.tensor([[[1.0, -1.0, 0.5, 0.5]]]), GRID)
        with pytest.raises(ValueError, match="positive sum"):
            attention_masks(torch.zeros(1, 1, 4), GRID)


class TestJaccard:
    def test_jaccard_index_with_void(self):
        prediction, target = patch_mask(0, 1), patch_mask(0)
        assert jaccard_index(prediction, target).item() == 0.5  # 4 / 8
        valid = ~patch_mask(1)
        assert jaccard_index(prediction, target, valid).item() == 1.0
        assert math.isnan(jaccard_index(patch_mask(), patch_mask()).item())

    def test_attention_exactly_on_the_object(self):
        scores, per_head = attention_jaccard(
            torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]), GRID, patch_mask(0)[None]
        )
        assert scores.tolist() == [1.0] and per_head.tolist() == [[1.0]]

    def test_half_overlap(self):
        # Kept: the top row (8 px); object: the left column (8 px); overlap: patch 0 (4 px).
        attention = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])
        scores, _ = attention_jaccard(attention, GRID, patch_mask(0, 2)[None])
        assert scores.item() == pytest.approx(4 / 12)

    def test_best_head_per_object(self):
        attention = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]])
        scores, per_head = attention_jaccard(attention, GRID, patch_mask(0)[None])
        assert scores.tolist() == [1.0]
        assert per_head.tolist() == [[0.0, 1.0]]

    def test_void_pixels_are_ignored(self):
        class_map = torch.zeros(4, 4, dtype=torch.uint8)
        class_map[patch_mask(0)] = 1
        class_map[patch_mask(1)] = 255
        attention = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])
        # Kept: the top row; the void half of it counts in neither intersection nor union.
        assert attention_jaccard(attention, GRID, class_map[None])[0].item() == 1.0
        class_map[patch_mask(1)] = 0
        assert attention_jaccard(attention, GRID, class_map[None])[0].item() == 0.5

    def test_objects_average_after_best_head(self):
        class_map = torch.zeros(4, 4, dtype=torch.uint8)
        class_map[patch_mask(0)] = 1
        class_map[patch_mask(3)] = 7
        # Head 0 keeps patch 0, head 1 the bottom row. Object 1: best head 0 (1.0); object 7:
        # best head 1 (4 px of 8 = 0.5); image: (1.0 + 0.5) / 2.
        attention = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]])
        scores, per_head = attention_jaccard(attention, GRID, class_map[None])
        assert scores.tolist() == [0.75]
        assert per_head.tolist() == [[0.5, 0.25]]

    def test_image_without_objects_is_nan(self):
        class_map = torch.full((1, 4, 4), 255, dtype=torch.uint8)
        class_map[0, 0] = 0
        scores, per_head = attention_jaccard(torch.ones(1, 2, 4), GRID, class_map)
        assert math.isnan(scores.item()) and per_head.isnan().all()

    def test_object_masks(self):
        objects, valid = object_masks(patch_mask(1, 2))
        assert objects.shape == (1, 4, 4) and valid.all()
        assert object_masks(patch_mask())[0].shape == (0, 4, 4)
        class_map = torch.tensor([[0, 3], [255, 1]], dtype=torch.uint8)
        objects, valid = object_masks(class_map)
        assert objects.int().tolist() == [[[0, 0], [0, 1]], [[0, 1], [0, 0]]]  # classes 1, 3
        assert valid.int().tolist() == [[1, 1], [0, 1]]
        with pytest.raises(TypeError, match="boolean or integer"):
            object_masks(torch.zeros(2, 2))


def blobs(*pixels: int, n: int = 9) -> torch.Tensor:
    """Logits over a 3x3 grid: 1 on the given pixels, 0 elsewhere."""
    logits = torch.zeros(n)
    logits[list(pixels)] = 1.0
    return logits


class TestStatistics:
    def test_map_statistics(self):
        logits = torch.stack(
            [
                blobs(0, 8),  # two opposite corners: 2 regions, entropy log 2
                blobs(4),  # one region
                blobs(),  # constant: no foreground, no region
                blobs(0, 4, 8),  # a diagonal: one region with 8-connectivity
                blobs(0, 1, 8),  # 2 regions holding 2/3 and 1/3 of the mass
            ]
        )[None]
        entropy, regions = map_statistics(logits, (3, 3))
        assert regions.tolist() == [[2, 1, 0, 1, 2]]
        p = torch.tensor([2 / 3, 1 / 3])
        expected = [math.log(2), 0.0, 0.0, 0.0, -(p * p.log()).sum().item()]
        assert entropy[0].tolist() == pytest.approx(expected, abs=1e-6)

    def test_regions_near_the_float32_limit_are_the_losss_regions(self):
        # A float32 sum of these logits overflows, so a float32 mean is inf and the map has no
        # foreground; the loss accumulates the mean in float64 (mean 1.5e38) and sees three
        # touching patches: one region. The counts must describe what the loss sees.
        logits = torch.tensor([[[3e38, 3e38, 3e38, -3e38]]])
        entropy, regions = map_statistics(logits, (2, 2))
        assert regions.tolist() == [[1]]
        assert entropy.tolist() == [[0.0]]

    def test_accumulated_statistics(self):
        stats = AttentionStatistics()
        # (B=2, heads=2): regions [[1, 2], [0, 1]].
        stats.update(torch.stack([blobs(4), blobs(0, 8)])[None], (3, 3))
        stats.update(torch.stack([blobs(), blobs(0, 1)])[None], (3, 3))
        result = stats.compute()
        assert result["regions_mean"] == 1.0
        assert result["regions_per_head"] == [0.5, 1.5]
        assert result["single_region_share"] == 0.5
        assert result["se_mean"] == pytest.approx(math.log(2) / 4, abs=1e-6)
        assert result["se_per_head"] == pytest.approx([0.0, math.log(2) / 2], abs=1e-6)
        assert result["images"] == 2 and "jaccard" not in result
        stats.reset()
        with pytest.raises(RuntimeError, match="update"):
            stats.compute()

    def test_shards_combine_through_their_sums(self):
        maps = [blobs(4), blobs(0, 8), blobs(), blobs(0, 1), blobs(0, 8), blobs(0, 1, 8)]
        logits = torch.stack(maps).reshape(3, 2, 9)
        whole = AttentionStatistics()
        whole.update(logits, (3, 3))
        shards = [AttentionStatistics(num_heads=2) for _ in range(3)]
        shards[0].update(logits[:1], (3, 3))
        shards[1].update(logits[1:], (3, 3))  # shards[2] stays empty, as a rank may
        collected = []  # what an all-reduce would sum: every shard's sums
        for shard in shards[:2]:
            shard.compute(reduce=lambda sums: collected.append(sums) or sums)
        with pytest.raises(RuntimeError, match="update"):
            shards[2].compute()
        combined = shards[2].compute(reduce=lambda sums: sums + sum(collected))
        expected = whole.compute()
        assert combined.keys() == expected.keys()
        for key, value in expected.items():
            assert combined[key] == pytest.approx(value), key

    def test_jaccard_averages_over_images_with_objects(self):
        stats = AttentionStatistics()
        logits = torch.zeros(3, 1, 4)
        attention = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.5, 0.5, 0.0, 0.0]], [[1.0] * 4]])
        masks = torch.stack([patch_mask(0), patch_mask(0, 2), patch_mask()])
        stats.update(logits, GRID, attention, masks)
        result = stats.compute()
        assert result["jaccard"] == pytest.approx((1.0 + 1 / 3) / 2)
        assert result["jaccard_images"] == 2
        with pytest.raises(ValueError, match="post-softmax"):
            stats.update(logits, GRID, masks=masks)


def test_evaluate_attention_matches_the_functions():
    torch.manual_seed(0)
    model = create_model("se_vit_tiny_patch4_32", num_classes=3, depth=1, in_chans=1)
    images = torch.randn(4, 1, 32, 32)
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 4:20] = True
    loader = [(images[:2], torch.zeros(2), masks[:2]), (images[2:], torch.zeros(2), masks[2:])]
    model.train()
    result = evaluate_attention(model, loader)
    assert model.training  # restored

    model.eval()
    with torch.no_grad(), AttentionCapture(model) as capture:
        model(images)
    entropy, regions = map_statistics(capture.logits, capture.grid_shape)
    scores, _ = attention_jaccard(capture.attention, capture.grid_shape, masks)
    assert result["se_mean"] == pytest.approx(entropy.mean().item(), abs=1e-6)
    assert result["regions_mean"] == pytest.approx(regions.double().mean().item())
    assert result["jaccard"] == pytest.approx(scores.mean().item())
    assert len(result["se_per_head"]) == 3 and result["images"] == 4

    unmasked = evaluate_attention(model, [(images, torch.zeros(4))], max_batches=1)
    assert "jaccard" not in unmasked


class _CountingLoader(list):
    """A list of batches that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        self.walks += 1
        return super().__iter__()


def test_evaluate_computes_accuracy_and_attention_in_one_pass():
    torch.manual_seed(0)
    model = create_model("se_vit_tiny_patch4_32", num_classes=3, depth=1, in_chans=1)
    images = torch.randn(5, 1, 32, 32)
    labels = torch.tensor([0, 1, 2, 1, 0])
    masks = torch.zeros(5, 32, 32, dtype=torch.bool)
    masks[:, 4:20, 8:24] = True
    loader = _CountingLoader(
        [(images[:3], labels[:3], masks[:3]), (images[3:], labels[3:], masks[3:])]
    )
    result = evaluate(model, loader, attention=True)
    assert loader.walks == 1

    # Oracle: the whole set in one forward pass, scored by hand and by the metric functions.
    model.eval()
    with torch.no_grad(), AttentionCapture(model) as capture:
        output = model(images)
    hits = (output.argmax(dim=1) == labels).double().mean().item()
    entropy, _ = map_statistics(capture.logits, capture.grid_shape)
    scores, _ = attention_jaccard(capture.attention, capture.grid_shape, masks)
    assert result["top1"] == pytest.approx(100 * hits)
    assert result["top5"] == 100.0  # 3 classes: every label is among the top 5
    assert result["loss"] == pytest.approx(F.cross_entropy(output, labels).item(), rel=1e-6)
    assert result["se_mean"] == pytest.approx(entropy.mean().item(), abs=1e-6)
    assert result["jaccard"] == pytest.approx(scores.mean().item())
    assert result["images"] == 5 and result["jaccard_images"] == 5

    plain = evaluate(model, [(images, labels)])
    assert set(plain) == {"top1", "top5", "loss", "images"}
    with pytest.raises(ValueError, match="accuracy or attention"):
        evaluate(model, [(images, labels)], accuracy=False)
