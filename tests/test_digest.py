"""One file digest: SHA-256 of the bytes, whatever the size, under every name it is exported as."""

from __future__ import annotations

import hashlib

import pytest

import mmsphere.models
import torch

from mmsphere.digest import BLOCK_BYTES, file_sha256, tensors_sha256


@pytest.mark.parametrize("size", [0, 1, BLOCK_BYTES, 2 * BLOCK_BYTES + 7])
def test_file_sha256_is_the_digest_of_the_whole_file(tmp_path, size):
    data = bytes((index * 31 + 7) % 251 for index in range(size))
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == file_sha256(path)


def test_the_public_name_in_models_is_the_same_helper():
    assert mmsphere.models.file_sha256 is file_sha256


def test_tensors_sha256_is_of_names_dtypes_shapes_and_values_in_name_order():
    tensors = {"b": torch.arange(6, dtype=torch.float32), "a": torch.ones(2, 3, dtype=torch.bfloat16)}
    digest = tensors_sha256(tensors.items())
    assert digest == tensors_sha256(reversed(list(tensors.items())))  # order given does not matter
    assert digest == tensors_sha256({name: value.clone() for name, value in tensors.items()}.items())
    for changed in ({**tensors, "b": tensors["b"].reshape(2, 3)}, {**tensors, "b": tensors["b"].double()},
                    {**tensors, "b": tensors["b"] + 1}, {"c": tensors["b"], "a": tensors["a"]}):
        assert tensors_sha256(changed.items()) != digest
