import os

import pytest

# Keep the suite within CI's two cores and make CPU results repeatable.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def interpreter_problem() -> str | None:
    """Why the Triton interpreter tests (CPU tensors) cannot run here, or None."""
    import numpy as np
    import torch

    if torch.cuda.is_available():
        # with a GPU, triton compiles for it and refuses CPU tensors; the gpu tests run instead
        return "the Triton interpreter tests run without a GPU; here the gpu tests run compiled"
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(x) for x in np.__version__.split(".")[:2])
    if version == (3, 6) and numpy_version >= (2, 3):
        return "triton 3.6's interpreter is broken with numpy >= 2.3"
    return None


def pytest_collection_modifyitems(config, items):
    import torch

    problem = interpreter_problem()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and problem is not None:
            item.add_marker(pytest.mark.skip(reason=problem))
