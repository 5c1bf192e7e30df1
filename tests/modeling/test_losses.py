import math

import pytest
import torch
from helpers import tiny_model, two_view_batch

from predet.config.pretrain import LossConfig
from predet.modeling.predet.contrastive import (
    multi_positive_info_nce,
    sample_query_rois,
)
from predet.modeling.predet.weak_head import weak_label_loss


def naive_info_nce(sim, positive):
    total = 0.0
    for i in range(len(sim)):
        denom = sum(math.exp(s) for s in sim[i])
        pos = [j for j, p in enumerate(positive[i]) if p]
        total += -sum(math.log(math.exp(sim[i][j]) / denom) for j in pos) / len(pos)
    return total / len(sim)


def test_info_nce_matches_naive_reference():
    torch.manual_seed(0)
    sim = torch.randn(6, 11, dtype=torch.float64) * 3
    positive = torch.rand(6, 11) < 0.3
    positive[torch.arange(6), torch.arange(6)] = True
    assert multi_positive_info_nce(sim, positive).item() == pytest.approx(naive_info_nce(sim.tolist(), positive.tolist()), rel=1e-9)


def test_weak_label_softmax_loss_uses_normalised_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    logp = torch.log_softmax(logits[0], 0)
    expected = -(0.5 * logp[0] + 0.5 * logp[1])
    assert weak_label_loss(logits, targets).item() == pytest.approx(expected.item())


def test_sampled_rois_always_include_the_target():
    torch.manual_seed(0)
    targets = torch.tensor([[[10, 10, 30, 30.0], [0, 0, 5, 5.0]]])
    proposals = torch.rand(1, 2, 6, 4) * 20
    proposals[..., 2:] += proposals[..., :2] + 1
    valid = torch.ones(1, 2, 6, dtype=torch.bool)
    rois, image = sample_query_rois(proposals, valid, targets, per_query=4)
    assert len(rois) <= 8 and (image == 0).all()
    for t in targets[0]:
        assert (rois == t).all(1).any()


def losses(loss_cfg, seed=0):
    torch.manual_seed(0)
    model = tiny_model(loss=loss_cfg)
    batch = two_view_batch(seed=seed)
    torch.manual_seed(1)
    return model, model(batch)


def test_each_lambda_removes_exactly_its_losses():
    _, full = losses(LossConfig())
    assert set(full) >= {"loss_cls", "loss_crpn_score", "loss_crpn_reg", "loss_nce", "loss_roi_reg"}
    _, no_cls = losses(LossConfig(lambda_cls=0))
    assert "loss_cls" not in no_cls
    for k in ("loss_crpn_score", "loss_crpn_reg", "loss_nce", "loss_roi_reg"):
        assert torch.equal(no_cls[k], full[k]), k
    _, no_roi = losses(LossConfig(lambda_roi=0))
    assert not {"loss_nce", "loss_roi_reg"} & set(no_roi)
    for k in ("loss_cls", "loss_crpn_score", "loss_crpn_reg"):
        assert torch.equal(no_roi[k], full[k]), k
    model, no_rpn = losses(LossConfig(lambda_rpn=0))
    assert not {"loss_crpn_score", "loss_crpn_reg"} & set(no_rpn)
    assert torch.equal(no_rpn["loss_cls"], full["loss_cls"])
    sum(v for k, v in no_rpn.items() if k.startswith("loss")).backward()
    assert all(p.grad is None for p in model.crpn.parameters())
    model, cls_only = losses(LossConfig(lambda_rpn=0, lambda_roi=0))
    assert set(cls_only) == {"loss_cls"} and torch.equal(cls_only["loss_cls"], full["loss_cls"])
    cls_only["loss_cls"].backward()  # classification alone does not run the FPN (a third of its cost)
    assert all(p.grad is None for p in model.backbone.fpn.parameters())


def test_lambda_scales_its_loss():
    _, full = losses(LossConfig())
    _, doubled = losses(LossConfig(lambda_rpn=2.0))
    torch.testing.assert_close(doubled["loss_crpn_score"], 2 * full["loss_crpn_score"])


def test_weak_head_norm_ignores_what_all_images_of_a_batch_share():
    """With ``norm`` a feature common to the whole batch cannot move the logits (the path by
    which small batches made them chase each batch's label frequencies)."""
    from predet.modeling.predet.weak_head import WeakLabelHead

    torch.manual_seed(0)
    c5 = torch.rand(6, 16, 2, 2)
    common = 3.0 * torch.rand(1, 16, 1, 1)
    for norm, moves in ((True, False), (False, True)):
        head = WeakLabelHead(16, 4, norm=norm).train()
        torch.nn.init.normal_(head.fc.weight)
        shifted = not torch.allclose(head(c5), head(c5 + common), atol=1e-4)
        assert shifted == moves, norm
