"""AWQ's scale search: the Gram-matrix error equals the output error it replaces.

For a group whose inspected output is its own linear (o_proj, down_proj, OPT's
fc1/fc2), the search scores each α with ``tr(ΔW Σ ΔWᵀ)`` from the inputs' Gram
matrix instead of running the calibration tokens through the linear. Both must
score every α alike and pick the same scales.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantfarm.spec import AWQOptions
from workers.engine.arch import LinearGroup
from workers.engine.methods import method_for
from workers.engine.methods.awq import COARSE_STEP, N_GRID, GroupInputs, gram_error, linear_inspect, scales_for, search_grid, weight_magnitude


def _inputs(tokens=2048, cols=256, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen)
    x[:, :8] *= 20  # a few outlier channels, as AWQ expects
    return list(x.view(4, tokens // 4, cols))


def test_gram_error_equals_the_summed_output_error():
    xs = _inputs()
    rec = GroupInputs(x=xs)
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(128, 256, generator=gen) * 1e-2
    direct = sum(float((x @ delta.t()).double().pow(2).sum()) for x in xs)
    assert abs(gram_error(delta, rec.gram()) - direct) <= 1e-4 * direct


@torch.no_grad()
def test_the_gram_search_picks_what_a_forward_per_alpha_picks():
    """The search against a plain reimplementation that runs the linear for every α."""
    xs = _inputs()
    lin = nn.Linear(256, 384, bias=True)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=torch.Generator().manual_seed(2))
    layer = nn.ModuleDict({"down": lin})
    group = LinearGroup(("down",), "up", "down")
    assert linear_inspect(group)
    method = method_for("awq", AWQOptions(group_size=128, alpha_search="full"))
    rec = GroupInputs(x=xs)

    got = method.search_scale(layer, group, rec)

    W = lin.weight.data.clone()
    w_mean, x_mean = weight_magnitude(W, 128), rec.x_mean()
    errors = []
    for i in range(N_GRID):
        s = scales_for(x_mean, w_mean, i / N_GRID)
        Wq = method._fake(W * s.view(1, -1)) / s.view(1, -1)
        errors.append(sum(float((nn.functional.linear(x, Wq, lin.bias) - lin(x)).double().pow(2).sum()) for x in xs))
    want = scales_for(x_mean, w_mean, min(range(N_GRID), key=errors.__getitem__) / N_GRID)
    assert torch.equal(got, want)
    assert torch.equal(lin.weight.data, W)  # the search leaves the weights as it found them
    assert min(errors) < errors[0]  # α = 0 is not already the answer: the test can tell searches apart


def test_only_single_linears_inspected_by_themselves_take_the_gram_path():
    assert linear_inspect(LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj"))
    assert linear_inspect(LinearGroup(("fc1",), "final_layer_norm", "fc1"))
    assert not linear_inspect(LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"))
    assert not linear_inspect(LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"))


def _counting(values):
    seen = []

    def score(i):
        seen.append(i)
        return values[i]

    return score, seen


@pytest.mark.parametrize("m", range(N_GRID))
def test_coarse_to_fine_finds_the_minimum_of_a_falling_then_rising_error(m):
    values = [abs(i - m) + 0.1 * (i > m) for i in range(N_GRID)]  # unimodal, minimum at m
    score, seen = _counting(values)
    assert search_grid(score) == m
    assert len(set(seen)) == len(seen) <= 11  # each point scored once, about half of them


def test_coarse_to_fine_can_miss_a_jagged_minimum_and_full_cannot():
    values = [1.0] * N_GRID
    values[0], values[10] = 0.99, 0.5  # a lone dip between two coarse points, far from the coarse best
    values[9] = values[11] = 1.2
    assert search_grid(_counting(values)[0], step=COARSE_STEP) == 0
    score, seen = _counting(values)
    assert search_grid(score, step=1) == 10 and seen == list(range(N_GRID))


def test_ties_go_to_the_lowest_alpha_as_the_full_loop_does():
    values = [2.0, 1.0, 1.0, 3.0] + [5.0] * (N_GRID - 4)
    assert search_grid(_counting(values)[0]) == 1
    assert search_grid(_counting(values)[0], step=1) == 1


def test_the_option_picks_the_search():
    assert AWQOptions().alpha_search == "coarse-to-fine"
    with pytest.raises(ValueError, match="alpha_search"):
        AWQOptions(alpha_search="random")
