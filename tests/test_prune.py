import torch

from paser.prune import magnitude_prune_


def test_magnitude_prune_zeroes_exactly_the_smallest_half_per_row(tiny_model_dir):
    from paser.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    magnitude_prune_(model, 0.5)
    after = model.model.layers[0].mlp.up_proj.weight
    assert ((after == 0).sum(dim=1) == before.shape[1] // 2).all()
    kept = after != 0
    assert torch.equal(after[kept], before[kept])
    magnitude = before.abs()
    dropped_max = magnitude.masked_fill(kept, 0).amax(dim=1)
    kept_min = magnitude.masked_fill(~kept, float("inf")).amin(dim=1)
    assert (dropped_max <= kept_min).all()  # per output row, the smallest half went
    assert (model.lm_head.weight != 0).all()
