"""The compiled extension: loaded when built, refused (with a warning, not a crash) when stale."""

import os
import re

import pytest

import sparse_ops
from sparse_ops import ops
from sparse_ops.ops import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_schema_version_matches_the_cpp_stamp():
    with open(os.path.join(ROOT, "csrc", "cpu", "schema_version.cpp")) as f:
        stamped = re.search(r'#define SPARSE_OPS_SCHEMA_VERSION "(\d+)"', f.read())
    assert int(stamped.group(1)) == ops.SCHEMA_VERSION


def test_extension_is_loaded_where_required():
    if os.environ.get("SPARSE_OPS_REQUIRE_EXT") != "1" and sparse_ops.extension_error():
        pytest.skip(f"extension not built: {sparse_ops.extension_error()}")
    assert sparse_ops.extension_error() is None
    assert [ops.cpu_backend(op) for op in ops.CPP_OPS] == ["cpp"] * len(ops.CPP_OPS)


def test_stale_build_is_detected_without_loading(tmp_path):
    stale = tmp_path / "_C.so"
    stale.write_bytes(b"\x7fELF...sparse_ops_schema_version=1;...")
    assert _extension.built_schema_version(str(stale)) == 1
    stale.write_bytes(b"\x7fELF no marker")
    assert _extension.built_schema_version(str(stale)) is None
