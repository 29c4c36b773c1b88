"""The benchmark data store and the GPU ceilings (the measurements themselves need a GPU)."""
import json

import pytest

from companion.book import bench


def test_save_and_load_round_trip(tmp_path):
    data = {"environment": {"device": "x"}, "results": {"b": 2.0, "a": [1, 2]}}
    path = bench.save("demo", data, directory=tmp_path)
    assert json.loads(path.read_text()) == data
    assert bench.load("demo", directory=tmp_path) == data


def test_missing_data_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m companion.book bench nothing"):
        bench.load("nothing", directory=tmp_path)


def test_stored_ceilings_name_their_device_and_are_plausible():
    stored = bench.load("ceilings")
    env, results = stored["environment"], stored["results"]
    assert "sm_" in env["device"] and env["torch"] and env["date"]
    # A Hopper-class GPU: between 1 and 10 TB/s of copy bandwidth, FP8 faster than BF16.
    assert 1e12 < results["copy_bytes_per_s"] < 1e13
    gemm = results["gemm_flops_per_s"]
    assert gemm["fp8_row_8192"] > gemm["bf16_8192"] > 1e14


def test_unknown_gemm_kind_is_refused():
    with pytest.raises(ValueError, match="unknown GEMM dtype 'int3'"):
        bench.gemm_flops(16, 16, 16, dtype="int3")


@pytest.mark.gpu
def test_measure_copy_bandwidth_on_the_gpu():
    assert bench.copy_bandwidth(1 << 26) > 1e11
