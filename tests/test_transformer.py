"""companion.transformer: the block's FLOPs by operation agree with the formulas of companion.costs."""
import pytest
import torch
import torch.nn as nn

from companion.costs import transformer_block_flops
from companion.transformer import OTHER, TransformerBlock, count_by_operation

MATMULS = ("QKV projections", "attention scores QKᵀ", "attention × V", "output projection", "MLP matmuls")


@pytest.mark.parametrize("style, mlp", [("bert", "gelu"), ("llama", "swiglu")])
def test_counter_matches_the_formulas(style, mlp):
    batch, seq, hidden, heads, inter = 2, 6, 16, 4, 24
    torch.manual_seed(0)
    block = TransformerBlock(hidden, heads, inter, style=style)
    x = torch.randn(batch, seq, hidden)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    counted = count_by_operation(block, x)
    expected = transformer_block_flops(seq, hidden, heads, inter, mlp=mlp, batch=batch)
    for op in MATMULS:
        assert counted[op]["flops"] == expected[op], op
    tokens = batch * seq
    # Elementwise conventions: softmax 5, LayerNorm 7, GELU 5, SiLU 4 FLOPs per element.
    assert counted["softmax"]["flops"] == 5 * batch * heads * seq * seq
    assert counted["MLP activation"]["flops"] == (5 if style == "bert" else 4) * tokens * inter
    if style == "bert":
        assert counted["norms"]["flops"] == 2 * 7 * tokens * hidden
    # Traffic: the softmax reads and writes every score once.
    assert counted["softmax"]["elements"] == 2 * batch * heads * seq * seq
    # A projection reads x and the weight (and bias), writes its output.
    weights = 3 * (hidden * hidden + (hidden if style == "bert" else 0))
    assert counted["QKV projections"]["elements"] == 3 * 2 * tokens * hidden + weights
    assert counted[OTHER]["flops"] > 0


def test_meta_device_counts_like_the_cpu():
    args = (32, 4, 64)
    cpu = count_by_operation(TransformerBlock(*args, style="llama"), torch.randn(1, 8, 32))
    with torch.device("meta"):
        block = TransformerBlock(*args, style="llama")
        x = torch.empty(1, 8, 32)
    assert count_by_operation(block, x) == cpu


def test_embedding_has_no_flops_and_reads_only_its_rows():
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(1000, 16))
    model.add_module("layer", TransformerBlock(16, 2, 32))
    ids = torch.randint(0, 1000, (1, 5))
    counted = count_by_operation(model, ids)
    assert list(counted)[0] == "embedding lookup"
    assert counted["embedding lookup"] == {"flops": 0, "elements": 5 + 2 * 5 * 16}


def test_llama_block_parameters():
    h, f = 64, 96
    block = TransformerBlock(h, 8, f, style="llama")
    assert sum(p.numel() for p in block.parameters()) == 4 * h * h + 3 * h * f + 2 * h


def test_bad_arguments():
    with pytest.raises(ValueError):
        TransformerBlock(16, 3, 32)
    with pytest.raises(ValueError):
        TransformerBlock(16, 2, 32, style="gpt")
