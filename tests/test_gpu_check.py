"""benchmarks/gpu_check.py --small: the GPU check's code, run on the CPU at a tiny size so it never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_small_runs_every_phase(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TWOSTEP_CACHE": str(tmp_path / "tc")}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "--out",
                        str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    for phase in ("latency", "pipeline", "update", "cache", "distill"):
        assert "error" not in r[phase] and "skipped" not in r[phase], (phase, r[phase])
    assert r["latency"]["batch1"]["sigmas_2step"] == [1.0, 0.75, 0.0]
    for key in ("lora_batch1", "full_batch1"):
        u = r["update"][key]
        assert u["sec_per_update"] > 0 and u["estimate_bytes"] > 0
    assert r["cache"]["samples_per_s_including_load"] > 0
    d = r["distill"]
    assert d["image_finite"] and d["image_shape"] == [1, 3, 32, 32] and d["exported_class"]
    assert (tmp_path / "out" / "gpu_check.md").read_text().startswith("# GPU check")
