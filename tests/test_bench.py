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


def test_rotation_count_holds_the_bytes_and_is_at_least_two():
    assert bench.rotation_count(32 << 20, 100_000_000) == 3      # 96 MiB would not hold 100 MB
    assert bench.rotation_count(1 << 30, 200_000_000) == 2       # one set exceeds it: still two
    assert bench.rotation_count(25_000_000, 100_000_000) == 4    # exactly


def test_unknown_gemm_kind_is_refused():
    with pytest.raises(ValueError, match="unknown GEMM dtype 'int3'"):
        bench.gemm_flops(16, 16, 16, dtype="int3")


@pytest.mark.gpu
def test_measure_copy_bandwidth_on_the_gpu():
    assert bench.copy_bandwidth(1 << 26) > 1e11


# Lines of `ncu --csv --metrics ...` output from the GPU machine (the NVFP4 launcher's last two kernels).
_NCU_CSV = '''==PROF== Connected to process 1393 (/usr/bin/python3.12)
==PROF== Disconnected from process 1393
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"2","1393","python3.12","127.0.0.1","_amax_kernel","1","7","(128, 1, 1)","(64, 32, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","83.02"
"2","1393","python3.12","127.0.0.1","_amax_kernel","1","7","(128, 1, 1)","(64, 32, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","48,320"
"2","1393","python3.12","127.0.0.1","_amax_kernel","1","7","(128, 1, 1)","(64, 32, 1)","0","9.0","Command line profiler metrics","launch__registers_per_thread","register/thread","52"
"3","1393","python3.12","127.0.0.1","_nvfp4_kernel","1","7","(128, 1, 1)","(512, 32, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","109.09"
"3","1393","python3.12","127.0.0.1","_nvfp4_kernel","1","7","(128, 1, 1)","(512, 32, 1)","0","9.0","Command line profiler metrics","smsp__inst_executed.sum","inst","67,043,328"
'''


def test_ncu_csv_is_read_per_kernel_with_units_and_thousands_separators():
    from companion.kernels.profile_quant import parse_ncu_csv

    amax, quantize = parse_ncu_csv(_NCU_CSV)
    assert amax == {"kernel": "_amax_kernel", "dram_pct": 83.02, "duration_us": 48.32, "registers": 52.0}
    assert quantize == {"kernel": "_nvfp4_kernel", "duration_us": 109.09, "instructions": 67043328.0}
    with pytest.raises(ValueError, match="unit"):
        parse_ncu_csv(_NCU_CSV.replace('"ns","48,320"', '"cycle","48,320"'))
