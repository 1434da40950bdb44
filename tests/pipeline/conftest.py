"""Fixtures of the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["local", "s3"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh history store lives: a local directory, or a prefix in a bucket of the S3 server."""
    if request.param == "local":
        return str(tmp_path / "history")
    return request.getfixturevalue("s3_uri")
