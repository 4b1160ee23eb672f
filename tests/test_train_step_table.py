"""benchmarks/train_step.py's table: every ratio it prints is taken within its own run (the efficient
path against the dense reference at the same L and dtype), and its goals read the measured figures."""

from tests.conftest import load_script


def row(path: str, L: int, tok_s: float, share: float, peak: float, dtype: str = "bf16") -> dict:
    return dict(L=L, dtype=dtype, path=path, ms=1e3 * L / tok_s, tok_s=tok_s, peak_rss_gib=peak,
                gflop_per_token=0.6, step_gflops=300 * share, gemm_gflops=300.0, gemm_share=share)


def test_ratios_come_from_the_same_run_and_goals_from_the_figures():
    bench = load_script("train_step")
    results = [row("reference", 512, 300, 0.9, 1.9), row("efficient", 512, 450, 0.76, 1.3),
               row("efficient", 4096, 400, 0.70, 3.5), row("efficient", 2048, 200, 0.5, 2.0, dtype="fp32"),
               dict(L=4096, dtype="bf16", path="reference", peak_rss_gib=18.2, error="out of memory (killed)")]
    lines = bench.table(results, online=False).splitlines()[2:]
    assert "1.50x" in lines[1] and "MET (share >= 75%)" in lines[1]
    assert " - " in lines[2].split("%")[1]  # no reference at 4096 in this run: no ratio is invented
    assert "MISSED (share >= 75%), MISSED (peak <= 3 GiB)" in lines[2]
    assert "share" not in lines[3] and "MET" not in lines[3]  # fp32 has no share goal
    assert "out of memory" in lines[4]
    assert bench.table(results[:2], online=True).splitlines()[3].rstrip().endswith("1.50x")  # no goals online
