import pytest
import torch
from helpers import tiny_model, two_view_batch
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes

from predet.modeling.precision import Float32BoxCoder
from predet.modeling.predet.crpn import (
    QueryConditionedRPN,
    anchor_labels,
    query_loop_reference,
    query_proposals,
    ranked_nms,
    sample_anchors,
)


def random_crpn(seed=0):
    torch.manual_seed(seed)
    crpn = QueryConditionedRPN(in_channels=16, query_dim=8, num_anchors=3, hidden=12).double()
    for p in crpn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    feats = [torch.randn(2, 16, 6, 5, dtype=torch.float64, requires_grad=True),
             torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)]
    queries = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    return crpn, feats, queries


def batched_outputs(crpn, feats, queries):
    trunk = crpn.trunk_features(feats)
    sw, sb, dw, db = crpn.dynamic_weights(queries)
    return crpn.scores(trunk, sw, sb), crpn.dense_deltas(trunk, dw, db)


def grads(crpn, feats, queries, outputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    tensors = list(crpn.parameters()) + feats + [queries]
    return torch.autograd.grad(loss, tensors)


def test_batched_crpn_equals_per_query_loop():
    crpn, feats, queries = random_crpn()
    batched = batched_outputs(crpn, feats, queries)
    loop = query_loop_reference(crpn, feats, queries)
    for b, l in zip(batched, loop):
        assert b.shape == l.shape
        torch.testing.assert_close(b, l, atol=1e-5, rtol=1e-5)
    for gb, gl in zip(grads(crpn, feats, queries, batched), grads(crpn, feats, queries, loop)):
        torch.testing.assert_close(gb, gl, atol=1e-5, rtol=1e-5)


def test_gathered_deltas_equal_dense_ones():
    crpn, feats, queries = random_crpn(3)
    trunk = crpn.trunk_features(feats)
    sw, sb, dw, db = crpn.dynamic_weights(queries)
    dense = crpn.dense_deltas(trunk, dw, db)
    img = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([4, 0, 2, 1])
    anchor = torch.tensor([0, 5, dense.shape[2] - 1, 40])
    torch.testing.assert_close(crpn.gather_deltas(trunk, dw, db, img, query, anchor), dense[img, query, anchor])


def test_ranked_deltas_equal_gathered_ones():
    crpn, feats, queries = random_crpn(4)
    trunk = crpn.trunk_features(feats)
    _, _, dw, db = crpn.dynamic_weights(queries)
    n, q = queries.shape[:2]
    anchor = torch.randint(0, trunk.shape[2] * crpn.num_anchors, (n, q, 7), generator=torch.Generator().manual_seed(0))
    img = torch.arange(n).view(n, 1, 1).expand_as(anchor).reshape(-1)
    query = torch.arange(q).view(1, q, 1).expand_as(anchor).reshape(-1)
    gathered = crpn.gather_deltas(trunk, dw, db, img, query, anchor.reshape(-1))
    torch.testing.assert_close(crpn.ranked_deltas(trunk, dw, db, anchor).reshape(-1, 4), gathered)


def test_anchor_equal_to_query_is_positive_and_far_anchors_negative():
    anchors = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 12, 12], [100, 0, 140, 30.0]])
    labels = anchor_labels(anchors, torch.tensor([[0, 0, 10, 10.0]]), fg_iou=0.7, bg_iou=0.3)
    assert labels[0].tolist() == [1.0, 0.0, -1.0, 0.0]


def test_model_anchor_as_query_is_positive():
    model = tiny_model()
    batch = two_view_batch()
    _, fpn = model.features(batch["view2"])
    anchors = model.anchors(batch["view2"], fpn)
    picked = anchors[[17, 300, len(anchors) - 2]]
    labels = anchor_labels(anchors, picked, 0.7, 0.3)
    assert labels[0, 17] == 1 and labels[1, 300] == 1 and labels[2, len(anchors) - 2] == 1
    far = (anchors[:, 0] - picked[0, 2]) > 20
    assert (labels[0, far] == 0).all()


def test_anchor_sampling_is_balanced():
    torch.manual_seed(0)
    labels = torch.zeros(3, 1000)
    labels[0, :300] = 1  # more positives than half the budget
    labels[1, :5] = 1
    labels[2, 500:] = -1
    pos, neg = sample_anchors(labels, per_query=256, pos_fraction=0.5)
    assert pos.sum(1).tolist() == [128, 5, 0]
    assert (pos.sum(1) + neg.sum(1)).tolist() == [256, 256, 256]
    assert not (pos & (labels != 1)).any() and not (neg & (labels != 0)).any()


def test_ranking_only_as_many_as_a_row_may_take_is_the_same_sample():
    # sample_anchors ranks at most per_query * pos_fraction positives: the same mask as
    # ranking per_query of them under the same random keys
    from predet.modeling.predet.crpn import sample_by_rank
    g = torch.Generator().manual_seed(0)
    eligible = torch.rand(20, 300, generator=g) < 0.3
    counts = torch.randint(0, 40, (20,), generator=g).clamp(max=16)
    torch.manual_seed(3)
    short = sample_by_rank(eligible, counts, 16)
    torch.manual_seed(3)
    long = sample_by_rank(eligible, counts, 64)
    assert torch.equal(short, long) and torch.equal(short.sum(1), torch.minimum(counts, eligible.sum(1)))


def clustered_boxes(groups, k, seed):
    """Boxes in a few tight clusters per row (so NMS suppresses many), sorted by random scores."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(groups, 4, 2, generator=g) * 60
    pick = torch.randint(0, 4, (groups, k), generator=g)
    xy = torch.gather(centres, 1, pick[..., None].expand(-1, -1, 2)) + torch.randn(groups, k, 2, generator=g) * 2
    wh = 4 + torch.rand(groups, k, 2, generator=g) * 16
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, ::7, 2:] = boxes[:, ::7, :2]  # degenerate boxes: invalid, must not suppress
    scores = torch.rand(groups, k, generator=g).sort(1, descending=True).values
    return boxes, scores


@pytest.mark.parametrize("thresh,chunk", [(0.3, 8), (0.5, 8), (0.7, 8), (0.5, 1), (0.5, 5), (0.5, 64)])
def test_ranked_nms_keeps_what_torchvision_nms_keeps_row_by_row(thresh, chunk):
    # chunk: how many boxes' overlaps are built at a time (5 does not divide the 48 boxes)
    boxes, scores = clustered_boxes(40, 48, seed=int(thresh * 10))
    valid = ((boxes[..., 2] - boxes[..., 0]) >= 1e-3) & ((boxes[..., 3] - boxes[..., 1]) >= 1e-3)
    kept = ranked_nms(boxes, valid, thresh, chunk=chunk)
    for row in range(len(boxes)):
        idx = valid[row].nonzero()[:, 0]
        expected = torch.zeros(boxes.shape[1], dtype=torch.bool)
        expected[idx[nms(boxes[row, idx], scores[row, idx], thresh)]] = True
        assert torch.equal(kept[row], expected), row
    assert 0.1 < kept.float().mean() < 0.9  # the case is not trivial: many suppressed, many kept


def test_query_proposals_equal_per_query_torchvision_nms():
    crpn, feats, queries = random_crpn(5)
    crpn = crpn.float()
    feats = [f.detach().float() for f in feats]
    trunk = crpn.trunk_features(feats)
    sw, sb, dw, db = crpn.dynamic_weights(queries.detach().float())
    scores = crpn.scores(trunk, sw, sb)
    n, q, total = scores.shape
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(total, 2, generator=g) * 40
    anchors = torch.cat([xy, xy + 4 + torch.rand(total, 2, generator=g) * 20], 1)
    size, k, top = (48, 40), 30, 8
    boxes, valid = query_proposals(crpn, trunk, scores, dw, db, anchors, size, pre_nms_top_n=k,
                                   nms_thresh=0.5, post_nms_top_n=top)
    coder = Float32BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    for i in range(n):
        for j in range(q):
            s, a = scores[i, j].topk(k)
            dense = crpn.dense_deltas(trunk, dw, db)[i, j, a]
            b = clip_boxes_to_image(coder.decode_single(dense, anchors[a]), size)
            large = remove_small_boxes(b, 1e-3)
            keep = large[nms(b[large], s[large], 0.5)][:top]
            assert valid[i, j].sum() == len(keep)
            torch.testing.assert_close(boxes[i, j, :len(keep)], b[keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize("max_keep", [1, 3, 8, 100])
def test_ranked_nms_stopped_early_keeps_each_rows_first_boxes(max_keep):
    # stopping once every row has max_keep boxes must not change those boxes
    boxes, _ = clustered_boxes(30, 48, seed=max_keep)
    valid = ((boxes[..., 2] - boxes[..., 0]) >= 1e-3) & ((boxes[..., 3] - boxes[..., 1]) >= 1e-3)
    full, early = ranked_nms(boxes, valid, 0.5), ranked_nms(boxes, valid, 0.5, max_keep=max_keep)
    first = full & (full.cumsum(1) <= max_keep)
    assert torch.equal(early & (early.cumsum(1) <= max_keep), first)
    assert not (early & ~full).any()


@pytest.mark.parametrize("size", [64, 65, 96, 801])
def test_the_loaders_anchors_are_the_models(size):
    # the CRPN sample drawn in the loader indexes the model's anchors: they must be the same boxes
    from predet.modeling.predet.meta_arch import crpn_target_sampler

    model = tiny_model(anchor_sizes=[16, 32, 64, 128, 256]).eval()
    view = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        _, fpn = model.features(view)
    assert torch.equal(crpn_target_sampler(model.cfg, size).anchors(), model.anchors(view, fpn))


def test_a_loader_drawn_crpn_sample_trains_as_one_drawn_in_the_model():
    """The same anchor sample, drawn in the model or handed over by the loader, gives the same
    losses; the loader's draw depends only on the samples' seeds; a sample for other anchors is
    refused."""
    from predet.modeling.predet.crpn import CRPNTargetSampler

    torch.manual_seed(0)
    model = tiny_model()
    batch = two_view_batch(n=2, size=64, q=4)
    _, fpn = model.features(batch["view1"], batch["view2"])
    fpn1, fpn2 = model.split_views(fpn, 2)
    z = model.embed_boxes(fpn1, batch["b1"], (64, 64))
    trunk, dw, db, scores = model.query_scores(fpn2, z, 2)
    anchors = model.anchors(batch["view2"], fpn2)
    loss = model.crpn_loss
    torch.manual_seed(5)
    in_model = loss(model.crpn, trunk, scores, dw, db, anchors, batch["b2"])
    torch.manual_seed(5)  # the same draw, made outside
    sample = sample_anchors(anchor_labels(anchors, batch["b2"].reshape(-1, 4), loss.fg_iou, loss.bg_iou),
                            loss.per_query, loss.pos_fraction)
    handed = loss(model.crpn, trunk, scores, dw, db, anchors, batch["b2"], sample)
    for key in in_model:
        torch.testing.assert_close(handed[key], in_model[key], rtol=0, atol=0)

    sampler = CRPNTargetSampler(64, model.cfg.anchor_sizes, model.cfg.aspect_ratios, loss.fg_iou, loss.bg_iou,
                                loss.per_query, loss.pos_fraction)
    pos, neg = sampler(batch["b2"], [11, 12])
    again_pos, again_neg = sampler(batch["b2"], [11, 12])
    _, other_neg = sampler(batch["b2"], [11, 13])  # (positives are few: all are taken whatever the seed)
    assert torch.equal(pos, again_pos) and torch.equal(neg, again_neg) and not torch.equal(neg, other_neg)
    labels = anchor_labels(anchors, batch["b2"].reshape(-1, 4), loss.fg_iou, loss.bg_iou)
    assert not (pos & (labels != 1)).any() and not (neg & (labels != 0)).any()
    assert ((pos | neg).sum(1) == loss.per_query).all()
    with pytest.raises(ValueError, match="anchors differ"):
        loss(model.crpn, trunk, scores, dw, db, anchors, batch["b2"], (pos[:, :-3], neg[:, :-3]))


def test_the_cpu_loader_sends_the_crpn_sample_and_the_gpu_one_does_not(fashiondet_tiny, tmp_path):
    from helpers import tiny_pretrain_config

    from predet.data.build import build_weak_dataset
    from predet.data.views import TwoViewTransform
    from predet.pretrain import build_pretrain_loader

    cfg = tiny_pretrain_config(fashiondet_tiny / "weak", tmp_path, 2)
    dataset, _ = build_weak_dataset(cfg.data.train, None, TwoViewTransform(cfg.data.views), 0)
    batch = next(iter(build_pretrain_loader(dataset, cfg, 0, 0, 1)))
    total = len(tiny_model(**{"anchor_sizes": cfg.model.anchor_sizes}).anchors(
        batch["view2"], {k: torch.zeros(1, 1, s, s) for k, s in zip("01234", (16, 8, 4, 2, 1))}))
    n, q = batch["b2"].shape[:2]
    assert batch["crpn_pos"].shape == batch["crpn_neg"].shape == (n * q, total)
    again = next(iter(build_pretrain_loader(dataset, cfg, 0, 0, 1)))  # deterministic in the iteration
    assert torch.equal(batch["crpn_pos"], again["crpn_pos"])


def test_iou_aware_scores_aim_positive_anchors_at_their_regressed_boxes_iou():
    """crpn_iou_aware: a positive anchor's score target is the IoU of its regressed box with the
    query's box (in [0, 1], below 1 unless the box lands exactly), negatives' stays 0, and the
    regression loss is unchanged."""
    torch.manual_seed(0)
    model = tiny_model(crpn_fg_iou=0.5)
    batch = two_view_batch(n=2, size=64, q=4)
    _, fpn = model.features(batch["view1"], batch["view2"])
    fpn1, fpn2 = model.split_views(fpn, 2)
    z = model.embed_boxes(fpn1, batch["b1"], (64, 64))
    trunk, dw, db, scores = model.query_scores(fpn2, z, 2)
    anchors = model.anchors(batch["view2"], fpn2)
    loss = model.crpn_loss
    sample = sample_anchors(anchor_labels(anchors, batch["b2"].reshape(-1, 4), loss.fg_iou, loss.bg_iou),
                            loss.per_query, loss.pos_fraction)
    seen = {}
    real = torch.nn.functional.binary_cross_entropy_with_logits

    def spy(logits, target, *args, **kwargs):
        seen["target"] = target
        return real(logits, target, *args, **kwargs)

    plain = loss(model.crpn, trunk, scores, dw, db, anchors, batch["b2"], sample)
    loss.iou_aware = True
    torch.nn.functional.binary_cross_entropy_with_logits = spy
    try:
        aware = loss(model.crpn, trunk, scores, dw, db, anchors, batch["b2"], sample)
    finally:
        torch.nn.functional.binary_cross_entropy_with_logits = real
    pos, neg = sample
    target = seen["target"]
    on_pos = pos[pos | neg]
    assert (target[~on_pos] == 0).all() and (target[on_pos] > 0).all() and (target[on_pos] < 1).all()
    torch.testing.assert_close(aware["loss_crpn_reg"], plain["loss_crpn_reg"])
    assert not torch.equal(aware["loss_crpn_score"], plain["loss_crpn_score"])


# ---------------------------------------------------------------- a second, smaller anchor on P2 only


def _p2_small_model(**kw):
    return tiny_model(anchor_sizes=[16, 32, 64, 128, 256], crpn_p2_small_anchor=8, **kw)


def _anchors_and_validity(model, size=64):
    view = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        _, fpn = model.features(view)
    return model.anchors(view, fpn), model.anchor_validity(view, fpn), fpn


def test_a_p2_small_anchor_adds_its_size_on_p2_and_nothing_elsewhere():
    plain_anchors, plain_valid, fpn = _anchors_and_validity(tiny_model(anchor_sizes=[16, 32, 64, 128, 256]).eval())
    anchors, valid, _ = _anchors_and_validity(_p2_small_model().eval())
    assert plain_valid is None and valid is not None
    p2 = fpn["0"].shape[-2] * fpn["0"].shape[-1]
    ratios = 3
    # P2: the plain anchors and the small ones, position by position; every other level: as before
    assert int(valid.sum()) == len(plain_anchors) + p2 * ratios
    real = anchors[valid]
    torch.testing.assert_close(real[2 * ratios * p2:], plain_anchors[ratios * p2:], rtol=0, atol=0)
    sides = ((real[: 2 * ratios * p2, 2:] - real[: 2 * ratios * p2, :2]).prod(1)).sqrt().round().unique()
    assert sides.tolist() == [8.0, 16.0]
    # what it is for: an 8-px query that no 16-px anchor reaches at IoU 0.5
    query = torch.tensor([[28.0, 28.0, 36.0, 36.0]])
    assert box_iou_max(query, plain_anchors) < 0.5 <= box_iou_max(query, real)


def box_iou_max(boxes, anchors):
    from torchvision.ops import box_iou

    return float(box_iou(boxes, anchors).max())


@pytest.mark.parametrize("size", [64, 96])
def test_the_loaders_p2_small_anchors_and_their_validity_are_the_models(size):
    from predet.modeling.predet.meta_arch import crpn_target_sampler

    model = _p2_small_model().eval()
    anchors, valid, _ = _anchors_and_validity(model, size)
    sampler = crpn_target_sampler(model.cfg, size)
    assert torch.equal(sampler.anchors(), anchors) and torch.equal(sampler._valid, valid)


def test_the_unused_anchor_slots_are_never_trained_nor_proposed(monkeypatch):
    import predet.modeling.predet.meta_arch as meta_arch
    from predet.modeling.predet.meta_arch import crpn_target_sampler

    torch.manual_seed(0)
    model = _p2_small_model()
    batch = two_view_batch(n=2, size=64, q=4)
    anchors, valid, _ = _anchors_and_validity(model)
    b2 = batch["b2"].reshape(-1, 4)
    labels = anchor_labels(anchors, b2, 0.5, 0.3, valid)
    assert (labels[:, ~valid] == -1).all() and (labels[:, valid] == 1).any(1).all()
    pos, neg = crpn_target_sampler(model.cfg, 64)(batch["b2"], [1, 2])
    assert not ((pos | neg) & ~valid).any() and pos.any(1).all()

    seen = []
    real_query_proposals = meta_arch.query_proposals

    def spy(crpn, trunk, scores, *args, **kwargs):
        seen.append(scores.detach().clone())
        return real_query_proposals(crpn, trunk, scores, *args, **kwargs)

    monkeypatch.setattr(meta_arch, "query_proposals", spy)
    losses = model(batch)  # the model draws its own sample here: the same rule
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # the unused slots rank below every real anchor, however the CRPN scores them
    top = seen[0].topk(model.cfg.pre_nms_top_n, dim=2).indices
    assert valid[top].all()


def test_a_p2_small_anchor_not_below_p2s_own_is_refused():
    from predet.config import ConfigError

    with pytest.raises(ConfigError, match="crpn_p2_small_anchor=16 must be smaller"):
        tiny_model(anchor_sizes=[16, 32, 64, 128, 256], crpn_p2_small_anchor=16)


def test_no_unused_slot_is_proposed_even_when_fewer_real_anchors_than_the_proposal_budget(monkeypatch):
    import predet.modeling.predet.meta_arch as meta_arch

    torch.manual_seed(0)
    model = _p2_small_model(pre_nms_top_n=100_000)  # more than the real anchors of a 64-px view
    batch = two_view_batch(n=2, size=64, q=4)
    _, valid, _ = _anchors_and_validity(model)
    seen = []
    real_query_proposals = meta_arch.query_proposals

    def spy(crpn, trunk, scores, dw, db, anchors, size, pre_nms_top_n, *args):
        seen.append((scores.detach().clone(), pre_nms_top_n))
        return real_query_proposals(crpn, trunk, scores, dw, db, anchors, size, pre_nms_top_n, *args)

    monkeypatch.setattr(meta_arch, "query_proposals", spy)
    model(batch)
    scores, k = seen[0]
    assert k == int(valid.sum())
    assert valid[scores.topk(k, dim=2).indices].all()
