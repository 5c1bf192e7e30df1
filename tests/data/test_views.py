import numpy as np
import pytest
import torch
from helpers import smooth_image
from PIL import Image
from torchvision.ops import roi_align

from predet.config.pretrain import ViewConfig
from predet.data.views import (
    ViewTransform,
    apply_colour,
    as_float_images,
    collate_two_view,
    colour_views,
    make_two_views,
    sample_colour,
)


def crop_region(view: torch.Tensor, box: torch.Tensor, flip: bool, size=12) -> torch.Tensor:
    patch = roi_align(view[None].float() / 255, [box[None]], output_size=size, aligned=True)[0]
    return patch.flip(-1) if flip else patch


@pytest.mark.parametrize("seed", range(12))
def test_query_pixels_match_between_views(seed):
    cfg = ViewConfig(size=96, jitter=0.0, hue=0.0, num_queries=8, min_query_px=12)
    out = make_two_views(smooth_image(seed), seed, cfg)
    flip1, flip2 = bool(out["transform1"][5]), bool(out["transform2"][5])
    for q in range(cfg.num_queries):
        a = crop_region(out["view1"], out["b1"][q], flip1)
        b = crop_region(out["view2"], out["b2"][q], flip2)
        assert (a - b).abs().mean() < 0.02, f"query {q}: regions differ"


@pytest.mark.parametrize("seed", range(30))
def test_queries_lie_inside_both_views(seed):
    cfg = ViewConfig(size=64, num_queries=16)
    out = make_two_views(smooth_image(seed, 300, 120), seed, cfg)
    for boxes in (out["b1"], out["b2"]):
        assert (boxes >= -1e-3).all() and (boxes <= cfg.size + 1e-3).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_map_and_unmap_are_inverse():
    t = ViewTransform(x0=13.5, y0=4.0, w=80.0, h=60.0, size=64, flip=True)
    boxes = torch.tensor([[20.0, 10.0, 50.0, 40.0], [14.0, 5.0, 90.0, 60.0]])
    assert torch.allclose(t.unmap_boxes(t.map_boxes(boxes)), boxes, atol=1e-4)


def test_same_seed_same_views_and_shapes():
    cfg = ViewConfig(size=48, num_queries=5)
    a = make_two_views(smooth_image(1), 7, cfg)
    b = make_two_views(smooth_image(1), 7, cfg)
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    assert a["seed"] == 7  # what the loader draws the sample's CRPN anchors from
    assert a["view1"].shape == (3, 48, 48) and a["b1"].shape == (5, 4)
    # uint8 across the loader's worker boundary: a quarter of float32's shared memory
    assert a["view1"].dtype == a["view2"].dtype == torch.uint8


def test_query_sizes_and_aspects_follow_config():
    cfg = ViewConfig(size=128, num_queries=64, min_query_px=4)
    out = make_two_views(smooth_image(3, 400, 400), 3, cfg)
    q = out["queries_src"]
    w, h = q[:, 2] - q[:, 0], q[:, 3] - q[:, 1]
    aspect = (w / h).numpy()
    assert aspect.min() >= 1 / 3 - 1e-3 and aspect.max() <= 3 + 1e-3
    assert np.unique(np.round(w.numpy(), 3)).size > 32  # sizes vary


def test_grayscale_views_keep_geometry_and_lose_colour():
    cfg = ViewConfig(size=48, num_queries=3, grayscale_p=1.0)
    out = make_two_views(smooth_image(2), 11, cfg)
    for view, params in ((out["view1"], out["colour1"]), (out["view2"], out["colour2"])):
        view = colour_views(view[None], params[None])[0]
        assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])
    plain = make_two_views(smooth_image(2), 11, ViewConfig(size=48, num_queries=3))
    assert torch.equal(out["b1"], plain["b1"]) and torch.equal(out["b2"], plain["b2"])


def test_decorrelated_colour_views_no_longer_share_their_colour():
    """The held-out contrastive check's views: a colour match between them is no longer a cue."""
    from predet.data.views import decorrelated_colours

    image = Image.new("RGB", (120, 100), (200, 60, 40))
    plain = ViewConfig(size=32, jitter=0.0, hue=0.0, num_queries=2)
    colour = lambda out, k: colour_views(out[f"view{k}"][None], out[f"colour{k}"][None])[0].mean(dim=(1, 2))
    gaps_plain, gaps_decorrelated = [], []
    for seed in range(20):
        a = make_two_views(image, seed, plain)
        b = make_two_views(image, seed, decorrelated_colours(plain))
        gaps_plain.append((colour(a, 1) - colour(a, 2)).abs().max().item())
        gaps_decorrelated.append((colour(b, 1) - colour(b, 2)).abs().max().item())
    assert max(gaps_plain) < 1e-3
    assert sum(g > 0.1 for g in gaps_decorrelated) >= 15, gaps_decorrelated


def test_colour_changes_drawn_in_the_loader_equal_those_applied_to_the_crop_directly():
    """The loader draws a view's jitter and sends its parameters; applied on the device they are
    the jitter torchvision's functions give when applied to the view in the same order."""
    import torchvision.transforms.functional as TF

    cfg = ViewConfig(size=40, num_queries=2, jitter=0.4, hue=0.3, grayscale_p=0.5)
    rng = np.random.default_rng(5)
    params = [sample_colour(rng, cfg) for _ in range(8)]
    assert len({tuple(p[5:].tolist()) for p in params}) > 1  # the order is random too
    assert {p[4].item() for p in params} == {0.0, 1.0}
    view = make_two_views(smooth_image(3), 3, cfg)["view1"]
    image = view.float() / 255
    for p in params:
        expected = image
        for i in p[5:].tolist():
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[int(i)]
            expected = adjust(expected, p[int(i)].item())
        expected = expected.clamp(0, 1)
        if p[4]:
            expected = TF.rgb_to_grayscale(expected, 3)
        assert torch.equal(apply_colour(image, p), expected)
    batch = colour_views(torch.stack([view, view]), torch.stack(params[:2]))
    assert torch.equal(batch[1], apply_colour(image, params[1]))
    none = ViewConfig(size=40, jitter=0.0, hue=0.0)
    assert torch.equal(colour_views(view[None], sample_colour(rng, none)[None])[0], image)


def test_collated_views_equal_stacked_views_and_reach_the_model_channel_planar():
    # The collate copies views in their pixel-interleaved layout (fast); values must not change,
    # and the float images the model sees must be ordinary contiguous NCHW tensors.
    cfg = ViewConfig(size=48, num_queries=3, min_query_px=4)
    samples = [make_two_views(smooth_image(s, 80, 64), s, cfg) for s in range(3)]
    batch = collate_two_view([dict(s, labels=torch.zeros(2)) for s in samples])
    for key in ("view1", "view2"):
        assert torch.equal(batch[key], torch.stack([s[key].contiguous() for s in samples]))
        floats = as_float_images(batch[key])
        assert floats.is_contiguous() and floats.dtype == torch.float32
        assert torch.equal(floats, torch.stack([s[key] for s in samples]).float() / 255)


def test_colours_applied_in_a_cpu_loader_equal_those_applied_on_the_device():
    cfg = ViewConfig(size=40, num_queries=2, min_query_px=4, jitter=0.4, hue=0.1, grayscale_p=0.3)
    samples = [dict(make_two_views(smooth_image(s, 80, 64), s, cfg), labels=torch.zeros(2)) for s in range(6)]
    on_device, in_loader = collate_two_view(samples), collate_two_view(samples, colour_in_loader=True)
    assert "colour1" not in in_loader and in_loader["view1"].dtype == torch.float32
    for view, colour in (("view1", "colour1"), ("view2", "colour2")):
        assert not torch.equal(on_device[colour][0], on_device[colour][1])  # real, different changes
        assert torch.equal(in_loader[view], colour_views(on_device[view], on_device[colour]))
