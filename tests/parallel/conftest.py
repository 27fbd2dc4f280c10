import pytest

from tests.dist_pool import DistPool


@pytest.fixture(scope="session", params=[2, 4], ids=["tp2", "tp4"])
def pool(request):
    """One gloo pool per world size for every test under tests/parallel (spawn once)."""
    p = DistPool(request.param)
    yield p
    p.close()
