"""One V2 datatype table: `capsa.manifest.V2_DATATYPES`; capsa.bundle and the server derive theirs from it, so a
bundle capsa saves is either served or refused at load with a message naming the datatype."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import capsa.bundle
import service.protocol
from capsa import vote
from capsa.bundle import load_bundle, save_bundle
from capsa.manifest import DATATYPE_NAMES, SERVED_DATATYPES, V2_DATATYPES
from service.manager import LoadError, read_signature
from tests.fixtures import archs


def test_the_tables_derive_from_the_manifest() -> None:
    assert set(capsa.bundle.DATATYPES) == set(DATATYPE_NAMES)
    assert set(service.protocol.DATATYPES) == set(SERVED_DATATYPES)
    for name in set(DATATYPE_NAMES) & set(SERVED_DATATYPES):
        torch_dtype, np_dtype = capsa.bundle.DATATYPES[name], service.protocol.DATATYPES[name]
        assert torch_dtype.itemsize == np_dtype.itemsize, name
        assert torch.empty(0, dtype=torch_dtype).numpy().dtype == np_dtype.newbyteorder("="), name
    assert V2_DATATYPES["BF16"].numpy is None and "BF16" in DATATYPE_NAMES


def _bundle(tmp_path: Path, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    wrapped = vote.Wrapper()(archs.mlp().to(dtype))
    x = torch.randn(4, 8, dtype=dtype)
    wrapped(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "save_bundle: architecture 'tests.fixtures", UserWarning)
        return save_bundle(wrapped, tmp_path / "b", architecture="tests.fixtures.archs:mlp", example_input=x)


def test_bf16_bundle_saves_and_loads_in_capsa_and_the_server_refuses_it_by_name(tmp_path: Path) -> None:
    path = _bundle(tmp_path, torch.bfloat16)
    assert capsa.is_wrapped(load_bundle(path, allowed_modules=["tests.fixtures.archs"]))
    with pytest.raises(LoadError, match=r"input 'input' is BF16; output 'prediction' is BF16.*does not serve"):
        read_signature(path)


def test_served_bundle_signature_comes_from_parse_manifest(tmp_path: Path) -> None:
    path = _bundle(tmp_path, torch.float32)
    spec, prediction, meta = read_signature(path)
    assert (spec.name, spec.datatype, spec.shape) == ("input", "FP32", [-1, 8])
    assert (prediction.name, prediction.datatype) == ("prediction", "FP32")
    assert service.protocol.DATATYPES[spec.datatype] == np.dtype("<f4")
    assert meta["weights_sha256"] == capsa.bundle.read_manifest(path).weights_sha256


def test_invalid_manifest_is_a_load_error_naming_the_field(tmp_path: Path) -> None:
    path = _bundle(tmp_path, torch.float32)
    text = (path / "capsa.json").read_text().replace('"FP32"', '"FP8"', 1)
    (path / "capsa.json").write_text(text)
    with pytest.raises(LoadError, match="FP8"):
        read_signature(path)
