import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No per-example deadline anywhere: on a loaded 2-core CI machine a 1 ms tensor op can take 300 ms, and a
# property test must fail on a wrong property, not on a slow scheduler.
settings.register_profile("twostep", deadline=None)
settings.load_profile("twostep")
torch.set_num_threads(int(os.environ.get("TWOSTEP_TEST_THREADS", "2")))


def make_tiny_teacher(folder, seed=0, dim=32, guidance=1.5, resolution=32):
    """A random-weight tiny Z-Image teacher folder (real diffusers class, 1 layer), for fast tests."""
    from twostep import flow
    from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
    from twostep.data.shapes import VERSION as SHAPES_VERSION
    from twostep.io.folders import save_model_folder

    tcfg = tiny_zimage_config(dim=dim, n_layers=1, n_heads=1, n_refiner_layers=1, patch_size=4)
    bb = ZImageBackbone.from_config(tcfg, seed=seed)
    cfg = {"kind": "teacher", "backbone": "zimage", "transformer": tcfg, "resolution": resolution,
           "text_encoder": "all-MiniLM-L6-v2", "data": "shapes", "data_version": SHAPES_VERSION,
           "sampling": {"steps": 8, "shift": flow.DEFAULT_SHIFT, "guidance": guidance}}
    save_model_folder(bb.transformer.state_dict(), cfg, folder)
    return folder


@pytest.fixture
def tiny_teacher(tmp_path):
    return make_tiny_teacher(tmp_path / "teacher")


def make_tiny_teacher_and_cache(root, num=16, shard_size=8):
    """A tiny teacher folder and a teacher cache of `num` shapes prompts under `root`, for loop-level tests."""
    from twostep.teacher.cache import build_cache

    teacher = make_tiny_teacher(root / "teacher")
    return teacher, build_cache(teacher, "shapes", num, root / "cache", shard_size=shard_size, progress=False)


@pytest.fixture(scope="module")
def tiny_loop(tmp_path_factory):
    """(root, teacher, cache) shared by one test module's training-loop tests."""
    root = tmp_path_factory.mktemp("loop")
    return (root, *make_tiny_teacher_and_cache(root))
