import torch

from wetr.config import make_config
from wetr.step import active_terms
from wetr.optim import build_optimizer, poly_warmup_multiplier, set_lr


class ReferencePolyWarmupAdamW:
    """The reference's stateful schedule, step by step (lr set before each AdamW step)."""

    def __init__(self, init_lr, warmup_iter, max_iter, warmup_ratio, power):
        self.init_lr, self.warmup_iter, self.max_iter = init_lr, warmup_iter, max_iter
        self.warmup_ratio, self.power, self.global_step = warmup_ratio, power, 0
        self.lr = init_lr

    def step(self):
        if self.global_step < self.warmup_iter:
            mult = 1 - (1 - self.global_step / self.warmup_iter) * (1 - self.warmup_ratio)
            self.lr = self.init_lr * mult
        elif self.global_step < self.max_iter:
            self.lr = self.init_lr * (1 - self.global_step / self.max_iter) ** self.power
        self.global_step += 1
        return self.lr


def test_schedule_matches_reference_loop():
    ref = ReferencePolyWarmupAdamW(6e-5, 15, 60, 1e-6, 0.9)
    for t in range(60):
        assert abs(6e-5 * poly_warmup_multiplier(t, 15, 1e-6, 60, 0.9) - ref.step()) < 1e-15


def test_param_groups_lr_and_decay():
    cfg = make_config(None, ["max_iters=100", "optim.warmup_iters=10"])
    groups = [[torch.nn.Parameter(torch.zeros(2))] for _ in range(4)]
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    groups[0].append(frozen)
    opt = build_optimizer(groups, cfg)
    assert [g["lr"] for g in opt.param_groups] == [6e-5, 6e-5, 6e-5 * 10, 6e-5 * 10]
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert all(p is not frozen for g in opt.param_groups for p in g["params"])
    lr = set_lr(opt, 0, cfg)
    assert abs(lr - 6e-5 * 1e-6) < 1e-18
    set_lr(opt, 50, cfg)
    assert abs(opt.param_groups[3]["lr"] - 6e-4 * 0.5 ** 0.9) < 1e-12


def test_loss_schedule_voc_and_coco():
    from scripts.train_coco import COCO
    from scripts.train_voc import VOC
    voc = make_config(VOC)
    assert not active_terms(2000, voc)["seg"] and active_terms(2001, voc)["seg"]
    assert active_terms(0, voc)["cle"] and active_terms(0, voc)["ptc"]
    coco = make_config(COCO)
    on = {t: active_terms(t, coco) for t in (8000, 8001, 12000, 12001, 16000, 16001)}
    assert not on[8000]["ptc"] and on[8001]["ptc"] and not on[8001]["cle"]
    assert not on[12000]["une"] and on[12001]["une"] and on[12001]["cle"]
    assert not on[16000]["reg"] and on[16001]["seg"] and on[16001]["reg"]
