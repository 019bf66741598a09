"""Helpers the tests share: tiny models and adapters, real MLflow servers, hook processes, checks.

pytest.ini puts tests/ on the import path, so tests import these as `support.<module>`.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
ADAPTER_FIXTURES = DATA / "adapters"
