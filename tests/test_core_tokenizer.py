import pytest
import torch

from hywu_nodes.core import LinearTarget, ParameterTokenizer, TargetSpec, build_target_spec
from tiny_models import tiny_flux, tiny_unet


def random_lora(spec, rank, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: (torch.randn(batch, rank, t.d_in, generator=g), torch.randn(batch, t.d_out, rank, generator=g)) for t in spec.targets}


SPECS = {
    "unequal": TargetSpec("sd15_ip2p", (LinearTarget("a", 5, 7, 0), LinearTarget("b", 64, 13, 0), LinearTarget("c", 1, 100, 1))),
    "unet": build_target_spec(tiny_unet(), "sd15_ip2p"),
    "flux": build_target_spec(tiny_flux(), "flux_kontext"),
}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("rank,width", [(1, 1), (4, 8), (3, 16), (16, 64)])
def test_tokenize_detokenize_is_exact(name, rank, width):
    spec = SPECS[name]
    tok = ParameterTokenizer(spec, rank, width)
    lora = random_lora(spec, rank)
    grid = tok.tokenize(lora)
    assert grid.shape == (3, tok.n_rows, tok.n_positions, rank, width)
    assert tok.n_tokens == sum(tok.a_chunks) + sum(tok.b_chunks)
    back = tok.detokenize(grid)
    assert back.keys() == lora.keys()
    for k in lora:
        assert torch.equal(back[k][0], lora[k][0]) and torch.equal(back[k][1], lora[k][1])
    # Padding (masked slots and the tail of partial tokens) is zero, so the grid holds exactly
    # the LoRA's entries and nothing else.
    assert grid.count_nonzero() == sum(a.count_nonzero() + b.count_nonzero() for a, b in lora.values())
    assert not grid[:, ~tok.mask].any()


def test_token_layout_is_rank_anchored():
    spec = TargetSpec("sd15_ip2p", (LinearTarget("l", 6, 4, 0),))
    tok = ParameterTokenizer(spec, rank=2, token_width=4)
    a = torch.arange(12.0).view(1, 2, 6)
    b = torch.arange(100.0, 108.0).view(1, 4, 2)
    grid = tok.tokenize({"l": (a, b)})
    assert tok.a_chunks == [2] and tok.b_chunks == [1] and tok.mask.tolist() == [[True, True, True]]
    assert torch.equal(grid[0, 0, 0], a[0, :, :4])  # first A token: every rank row, columns 0..3
    assert torch.equal(grid[0, 0, 1, :, :2], a[0, :, 4:])
    assert torch.equal(grid[0, 0, 2], b[0].t())  # B tokens come from B transposed


def test_detokenize_ignores_padding_and_roundtrips_grids():
    spec = SPECS["unequal"]
    tok = ParameterTokenizer(spec, 2, 8)
    grid = torch.randn(2, tok.n_rows, tok.n_positions, 2, 8)
    again = tok.tokenize(tok.detokenize(grid))
    # Real entries survive; padded slots and partial-token tails become zero.
    assert torch.equal(tok.detokenize(again)["b"][0], tok.detokenize(grid)["b"][0])
    assert not again[:, ~tok.mask].any()


def test_wrong_shapes_are_reported():
    spec = SPECS["unequal"]
    tok = ParameterTokenizer(spec, 2, 8)
    lora = random_lora(spec, 2)
    lora["b"] = (lora["b"][0][:, :, :10], lora["b"][1])
    with pytest.raises(ValueError, match="b: expected A"):
        tok.tokenize(lora)


def test_wide_layers_continue_on_more_rows():
    # One 1280->10240 layer among 320-wide ones would otherwise pad every row to its length.
    targets = [LinearTarget(f"l{i}", 320, 320, i) for i in range(6)] + [LinearTarget("wide", 1280, 10240, 6)]
    tok = ParameterTokenizer(TargetSpec("sd15_ip2p", tuple(targets)), rank=2, token_width=64)
    assert tok.row_tokens == 10 and tok.rows_per_target == [1] * 6 + [18]
    assert tok.mask.numel() == 240 and tok.n_tokens == 6 * 10 + 180  # no padding at all here
    lora = random_lora(tok.spec, 2, batch=1)
    back = tok.detokenize(tok.tokenize(lora))
    assert all(torch.equal(back[k][0], lora[k][0]) and torch.equal(back[k][1], lora[k][1]) for k in lora)
    fixed = ParameterTokenizer(tok.spec, rank=2, token_width=64, row_tokens=180)
    assert fixed.n_rows == 7 and fixed.mask.numel() == 7 * 180
