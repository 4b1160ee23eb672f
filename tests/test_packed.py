"""decode/packed.py: float32 linears on packed weights while decoding, and only then; each row's result
independent of the rows beside it; greedy equality of the decoders on that path (float32)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from draftforge.decode.eagle3 import SpeculativeDecoder
from draftforge.decode.packed import packed_linears
from draftforge.decode.plain import plain_generate
from draftforge.decode.spec import SpecConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_speculate import PROMPTS, oracle_for, random_draft  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch"),
              pytest.mark.usefixtures("one_thread")]




def test_packed_only_inside_the_block_and_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.Linear(300, 7, bias=False), nn.Linear(7, 5).double())
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = model[1](model[0](x))
        with packed_linears(model):
            assert {"forward"} <= set(vars(model[0])) and "forward" not in vars(model[2])  # float64 stays
            with packed_linears(model):  # nested: the inner block leaves the outer one's forwards alone
                pass
            out = model[1](model[0](x))
            rows = torch.cat([model[1](model[0](x[i : i + 1])) for i in range(8)])
            model[0].weight.mul_(2.0)  # changed in place: packed again on the next entry
        assert not any("forward" in vars(m) for m in model)
        with packed_linears(model):
            doubled = model[0](x)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out, rows)  # plain decoding (1 row) and verification (many) compute the same row
    torch.testing.assert_close(doubled, model[0](x))


def test_greedy_equality_in_float32():
    target = tiny_model("llama", dtype=torch.float32)
    refs = plain_generate(target, PROMPTS, 24)
    for draft in (random_draft(target, draft_vocab=300, dtype=torch.float32),
                  oracle_for(target, PROMPTS, refs, dtype=torch.float32)):
        dec = SpeculativeDecoder(target, draft)
        for spec in (SpecConfig(1, 3, 1, 4), SpecConfig(1, 4, 3, 8)):
            assert [dec.generate([p], spec, 24).tokens[0] for p in PROMPTS] == refs, spec
    assert dec.generate(PROMPTS, SpecConfig(3, 3, 2, 6), 24).tokens == refs
