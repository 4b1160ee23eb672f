"""benchmarks/dflash_blocks.py: which configs each block size is decoded at, and its chart."""

import json

from tests.conftest import load_script


def _module():
    return load_script("dflash_blocks")


def test_a_block_is_decoded_whole_and_at_the_eagle3_chains_depth():
    configs = _module().block_configs
    assert configs(4) == {"block": "1,3,1,4"}  # its whole block is the chain's depth already
    assert configs(8) == {"block": "1,7,1,8", "k3": "1,3,1,4"}
    assert configs(16) == {"block": "1,15,1,16", "k3": "1,3,1,4"}


def test_the_chart_draws_blocks_beside_the_eagle3_row(tmp_path):
    chain = {"tau": 1.35, "speedup": 0.7, "ngram_tau": 2.8}
    report = {"eagle3": {"builtin": {"chain": chain}}, "blocks": [
        {"block_size": 4, "builtin": {"block": {"tau": 1.3}}},
        {"block_size": 8, "builtin": {"block": {"tau": 1.4}, "k3": {"tau": 1.3}}},
    ]}
    png = tmp_path / "blocks.png"
    _module().plot(report, png)
    assert png.stat().st_size > 1000


def test_rows_measured_on_other_prompts_are_not_kept(tmp_path):
    earlier = _module().earlier_rows
    path = tmp_path / "blocks.json"
    assert earlier(path, 10, 64) == []
    eval_ = {"suite": "mtbench", "prompts": 10, "max_new_tokens": 64}
    path.write_text(json.dumps({"eval": eval_, "blocks": [{"block_size": 4}]}))
    assert earlier(path, 10, 64) == [{"block_size": 4}]
    assert earlier(path, 30, 128) == []  # another yardstick: its τ does not compare
