"""The sparse-matrix RoIAlign is torchvision's MultiScaleRoIAlign: same values, same gradients."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from predet.modeling.poolers import SparseMultiScaleRoIAlign, bags_to_csr

NAMES = ["0", "1", "2", "3"]


def fpn_maps(n: int, size: int, channels: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, channels, size // 2 ** (i + 2), size // 2 ** (i + 2), generator=g, requires_grad=True)
            for i, name in enumerate(NAMES)} | {"pool": torch.randn(n, channels, 1, 1, generator=g)}


def random_boxes(n: int, per_image: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    """Boxes of every scale, some partly or wholly outside the image and some thinner than a pixel."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(n):
        xy = torch.rand(per_image, 2, generator=g) * (size * 1.2) - size * 0.1
        wh = torch.exp(torch.rand(per_image, 2, generator=g) * torch.log(torch.tensor(size * 1.0)))
        wh[:3] = torch.tensor([[0.3, 0.5], [size * 2.0, 4.0], [1.0, size * 1.0]])
        boxes.append(torch.cat([xy, xy + wh], 1))
    return boxes


@pytest.mark.parametrize("size,canonical", [(64, 64), (64, 224), (96, 224), (160, 224)])
def test_sparse_roi_align_equals_torchvision(size, canonical):
    maps = fpn_maps(3, size)
    boxes = random_boxes(3, 40, size)
    shapes = [(size, size)] * 3
    ours = SparseMultiScaleRoIAlign(NAMES, 7, 2, canonical_scale=canonical)(maps, boxes, shapes)
    theirs = MultiScaleRoIAlign(NAMES, 7, 2, canonical_scale=canonical)(maps, boxes, shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    weights = torch.randn_like(theirs)
    grads_ours = torch.autograd.grad((ours * weights).sum(), [maps[k] for k in NAMES])
    grads_theirs = torch.autograd.grad((theirs * weights).sum(), [maps[k] for k in NAMES])
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_images_without_boxes_and_a_single_level():
    maps = fpn_maps(3, 64)
    boxes = random_boxes(3, 5, 64)
    boxes[1] = boxes[1][:0]  # an image with no RoIs
    for names in (NAMES, ["1"]):
        ours = SparseMultiScaleRoIAlign(names, 7, 2)(maps, boxes, [(64, 64)] * 3)
        theirs = MultiScaleRoIAlign(names, 7, 2)(maps, boxes, [(64, 64)] * 3)
        assert ours.shape == (10, 8, 7, 7)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_no_rois_at_all_and_all_rois_on_one_level():
    maps = fpn_maps(2, 64)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    assert SparseMultiScaleRoIAlign(NAMES, 7, 2)(maps, empty, [(64, 64)] * 2).shape == (0, 8, 7, 7)
    tiny = [torch.tensor([[1.0, 1.0, 5.0, 6.0], [10.0, 3.0, 14.0, 9.0]])] * 2  # all on P2
    ours = SparseMultiScaleRoIAlign(NAMES, 7, 2, canonical_scale=64)(maps, tiny, [(64, 64)] * 2)
    theirs = MultiScaleRoIAlign(NAMES, 7, 2, canonical_scale=64)(maps, tiny, [(64, 64)] * 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_double_precision_unequal_images_and_far_away_boxes():
    maps = {k: v.detach().double().requires_grad_() for k, v in fpn_maps(2, 96).items()}
    boxes = random_boxes(2, 30, 96)
    boxes[0][5] = torch.tensor([1e20, 1e20, 2e20, 2e20])  # pools zeros, must not read out of bounds
    boxes = [b.double() for b in boxes]
    shapes = [(96, 80), (72, 96)]
    ours = SparseMultiScaleRoIAlign(NAMES, 7, 2)(maps, boxes, shapes)
    theirs = MultiScaleRoIAlign(NAMES, 7, 2)(maps, boxes, shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    assert ours[5].abs().max() == 0
    weights = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), [maps[k] for k in NAMES]),
                    torch.autograd.grad((theirs * weights).sum(), [maps[k] for k in NAMES])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kwargs", [{"output_size": (7, 5), "sampling_ratio": 2}, {"output_size": 7, "sampling_ratio": 0},
                                    {"output_size": 7, "sampling_ratio": 3}])
def test_what_the_sparse_path_does_not_cover_still_equals_torchvision(kwargs):
    maps = fpn_maps(2, 64)
    boxes = random_boxes(2, 10, 64)
    ours = SparseMultiScaleRoIAlign(NAMES, **kwargs)(maps, boxes, [(64, 64)] * 2)
    theirs = MultiScaleRoIAlign(NAMES, **kwargs)(maps, boxes, [(64, 64)] * 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_the_backward_matrix_is_a_valid_csr_equal_to_the_coalesced_sums():
    g = torch.Generator().manual_seed(0)
    cols = torch.randint(0, 30, (50, 16), generator=g)  # many shared positions per row
    cols[7] = 3  # a row that is one position 16 times
    vals = torch.rand(50, 16, generator=g, dtype=torch.float64)
    m = bags_to_csr(cols, vals, 30)
    torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape, check_invariants=True)
    rows = torch.arange(50).repeat_interleave(16)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols.reshape(-1)]), vals.reshape(-1), (50, 30),
                                  check_invariants=True).coalesce()
    torch.testing.assert_close(m.to_dense(), coo.to_dense(), rtol=0, atol=1e-12)


def test_the_bags_rows_come_sorted_so_the_backward_may_skip_its_sort():
    # the backward builds its matrix with rows_sorted=True: that is right only if every bag's
    # positions are in increasing order, boxes of every scale and outside the image included
    from predet.modeling.poolers import roi_align_bags
    boxes = random_boxes(3, 40, 96)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    levels = torch.randint(0, 4, (len(rois),), generator=torch.Generator().manual_seed(2))
    shapes = [(3, 96 // 2 ** (i + 2), 96 // 2 ** (i + 2)) for i in range(4)]
    cols, vals = roi_align_bags(rois, levels, shapes, [1 / 2 ** (i + 2) for i in range(4)], 7, 2)
    assert (cols[:, 1:] >= cols[:, :-1]).all()
    positions = sum(n * h * w for n, h, w in shapes)
    sorted_path = bags_to_csr(cols, vals, positions, rows_sorted=True)
    shuffled = torch.randperm(cols.shape[1], generator=torch.Generator().manual_seed(3))
    general_path = bags_to_csr(cols[:, shuffled], vals[:, shuffled], positions)
    torch.testing.assert_close(sorted_path.to_dense(), general_path.to_dense(), rtol=0, atol=1e-7)
    assert torch.equal(sorted_path.col_indices(), general_path.col_indices())


def test_box_head_on_the_cpu_pools_layout_equals_the_plain_head():
    # the sparse path returns channels-last pooled features; BoxHead folds that layout into
    # fc6's weight: the same features and gradients as torchvision's head on a contiguous copy
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    from predet.modeling.poolers import BoxHead

    torch.manual_seed(0)
    head = BoxHead(8 * 49, 16).double()
    maps = fpn_maps(2, 64)
    maps = {k: v.double().detach().requires_grad_() for k, v in maps.items()}
    pooled = SparseMultiScaleRoIAlign(NAMES, 7, 2, canonical_scale=64)(maps, random_boxes(2, 10, 64), [(64, 64)] * 2)
    assert not pooled.is_contiguous()
    ours, plain = head(pooled), TwoMLPHead.forward(head, pooled.contiguous())
    torch.testing.assert_close(ours, plain)
    params = [head.fc6.weight, head.fc6.bias, maps["0"], maps["1"]]
    grads_ours = torch.autograd.grad(ours.sum(), params, retain_graph=True)
    for a, b in zip(grads_ours, torch.autograd.grad(plain.sum(), params)):
        torch.testing.assert_close(a, b)
