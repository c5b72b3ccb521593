"""Tensor codec: round trips for every dtype, chunking, and clear errors for malformed tensors."""

from __future__ import annotations

import pytest
import torch
from protege.errors import InvalidTensor
from protege.services.common import codec
from protege.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.float64])
def test_round_trip_every_dtype(dtype):
    x = (torch.randn(3, 5, 7) * 100).to(dtype)
    msg = codec.encode(x)
    assert len(msg.data) == x.numel() * x.element_size()
    y = codec.decode(msg)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, y)


def test_bf16_travels_as_two_raw_bytes():
    x = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    msg = codec.encode(x)
    assert msg.dtype == tensor_pb2.DTYPE_BFLOAT16
    expected = x.view(torch.int16).numpy().astype("<i2").tobytes()
    assert msg.data == expected


def test_non_contiguous_and_empty_and_scalar():
    x = torch.arange(12.0).view(3, 4).t()
    torch.testing.assert_close(codec.decode(codec.encode(x)), x, rtol=0, atol=0)
    assert codec.decode(codec.encode(torch.empty(0, 4))).shape == (0, 4)
    assert codec.decode(codec.encode(torch.tensor(2.5))).item() == 2.5


def test_size_mismatch_names_the_problem():
    msg = codec.encode(torch.zeros(2, 3))
    msg.shape[:] = [2, 4]
    with pytest.raises(InvalidTensor, match=r"do not match dtype .* shape \[2, 4\].*expected 32"):
        codec.decode(msg, "logits")


def test_unset_dtype_is_rejected():
    with pytest.raises(InvalidTensor, match="unknown or unset dtype"):
        codec.decode(tensor_pb2.Tensor(shape=[1], data=b"\0\0\0\0"))


def test_negative_dimension_is_rejected():
    with pytest.raises(InvalidTensor, match="negative dimension"):
        codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1], data=b""))


def test_chunks_reassemble_in_order():
    tensors = {"a": torch.randn(1000), "b": torch.randn(7, 3).bfloat16(), "c": torch.empty(0)}
    asm = codec.ChunkAssembler()
    pieces = [c for name, t in tensors.items() for c in codec.iter_chunks(name, t, chunk_bytes=512)]
    assert len(pieces) > 8
    assert all(len(p.data) <= 512 for p in pieces)
    for piece in pieces:
        asm.add(piece)
    out = asm.finish()
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(out[name], t)
    assert asm.bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_chunk_errors():
    pieces = list(codec.iter_chunks("w", torch.randn(300), chunk_bytes=256))
    asm = codec.ChunkAssembler()
    asm.add(pieces[0])
    with pytest.raises(InvalidTensor, match="stream ended before the last piece of 'w'"):
        asm.finish()
    with pytest.raises(InvalidTensor, match="expected 256"):
        asm.add(pieces[2])  # skipped piece 1
    other = next(codec.iter_chunks("v", torch.randn(2)))
    with pytest.raises(InvalidTensor, match="before 'w' was complete"):
        asm.add(other)
    asm2 = codec.ChunkAssembler()
    for p in codec.iter_chunks("v", torch.randn(2)):
        asm2.add(p)
    with pytest.raises(InvalidTensor, match="sent twice"):
        asm2.add(next(codec.iter_chunks("v", torch.randn(2))))


def test_a_tensor_in_several_pieces_is_copied_once_into_a_writable_buffer():
    t = torch.randn(5000).bfloat16()
    pieces = list(codec.iter_chunks("w", t, chunk_bytes=4096))
    asm = codec.ChunkAssembler()
    for piece in pieces[:-1]:
        asm.add(piece, piece.data)  # the caller's one read of the bytes
    asm.add(pieces[-1])
    out = asm.finish()["w"]
    assert torch.equal(out, t) and out.dtype == torch.bfloat16
    out[0] = 1.0  # a buffer of its own, not a view of the (immutable) message bytes
    assert asm.bytes == t.numel() * t.element_size()


def test_pieces_past_the_declared_size_are_refused_before_they_are_copied():
    pieces = list(codec.iter_chunks("w", torch.randn(300), chunk_bytes=512))
    pieces[-1].shape[:] = [256]  # declares 1024 bytes; 1200 arrive
    for p in pieces:
        p.shape[:] = [256]
    asm = codec.ChunkAssembler()
    asm.add(pieces[0])
    asm.add(pieces[1])
    with pytest.raises(InvalidTensor, match="expected 1024 bytes"):
        asm.add(pieces[2])
    short = list(codec.iter_chunks("v", torch.randn(300), chunk_bytes=512))
    for p in short:
        p.shape[:] = [400]
    asm = codec.ChunkAssembler()
    for p in short[:-1]:
        asm.add(p)
    with pytest.raises(InvalidTensor, match="do not match dtype"):
        asm.add(short[-1])


def test_staging_buffer_is_aligned_to_a_huge_page_when_large():
    big = codec.staging_buffer(9 << 20)
    assert big.numel() == 9 << 20 and big.dtype == torch.uint8
    assert big.data_ptr() % codec.HUGE_PAGE == 0 or not codec.sys.platform.startswith("linux")
    big.fill_(7)
    assert int(big.sum()) == 7 * (9 << 20)
    assert codec.staging_buffer(10).numel() == 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_has_nonfinite_finds_nan_and_infinities_anywhere(dtype):
    x = torch.randn(4097).to(dtype)
    assert not codec.has_nonfinite(x)
    assert not codec.has_nonfinite(torch.full((9,), torch.finfo(dtype).max, dtype=dtype))
    assert not codec.has_nonfinite(torch.empty(0, dtype=dtype))
    for where in (0, 2048, 4096):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[where] = bad
            assert codec.has_nonfinite(y), (where, bad)
            assert codec.has_nonfinite(y.view(1, -1)[:, :].t())  # any layout
    assert not codec.has_nonfinite(torch.arange(5))
