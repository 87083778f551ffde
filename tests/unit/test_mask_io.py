"""masks.safetensors: bit-packed masks (packed-bits-v1), the first release's bool files, lazy reading."""

import gc
import hashlib
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparse_recover.errors import RunDirError
from sparse_recover.sparsity import io as mask_io
from sparse_recover.sparsity.io import load_masks, masks_sha256, pack_mask, save_masks, unpack_mask

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "masks_bool_v1.json"
# masks_sha256 the first release's save_masks returned when it wrote the file FIXTURE describes
FIXTURE_SHA256 = "032c3cb20afd106cf74ec1e33e113478a336a68a29f50b55c13387eaf7ceb444"
FIXTURE_SHAPES = {"model.layers.0.self_attn.q_proj.weight": (8, 13), "model.layers.0.mlp.down_proj.weight": (5, 24),
                  "transformer.h.0.attn.c_attn.weight": (12, 7), "model.layers.1.self_attn.o_proj.weight": (3, 1)}


def fixture_masks() -> dict[str, torch.Tensor]:
    """The masks FIXTURE holds (arithmetic, so no RNG version can change them)."""
    out = {}
    for n, (name, (rows, cols)) in enumerate(FIXTURE_SHAPES.items()):
        i, j = torch.arange(rows).unsqueeze(1), torch.arange(cols).unsqueeze(0)
        out[name] = ((i * 7 + j * 3 + n) % 5) < 3
    return out


def random_masks(shapes, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}.weight": torch.rand(s, generator=g) < 0.5 for i, s in enumerate(shapes)}


def first_release_sha256(masks) -> str:
    """masks_sha256 as the first release computed it, restated."""
    h = hashlib.sha256()
    for key in sorted(masks):
        h.update(key.encode())
        h.update(masks[key].to("cpu", torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_bool(path, masks, transposed=()):
    """The first release's bool format."""
    meta = {"format": "sparse-recover-masks/1", "convention": "True=keep, (out, in)", "pattern": "unstructured",
            "transposed": json.dumps(sorted(transposed))}
    save_file({k: v.contiguous() for k, v in sorted(masks.items())}, str(path), metadata=meta)


def rewrite(path, *, meta=None, tensors=None):
    """Write `path` again with its metadata and tensors updated (to damage it on purpose)."""
    with safe_open(str(path), framework="pt") as fh:
        old_meta = dict(fh.metadata())
        old = {k: fh.get_tensor(k) for k in fh.keys()}
    old_meta.update(meta or {})
    old.update(tensors or {})
    save_file(old, str(path), metadata={k: v for k, v in old_meta.items() if v is not None})


@pytest.mark.parametrize("shape", [(3, 5), (64, 128), (7, 1001), (2, 8), (4, 9), (1, 1), (0, 5), (3, 0)])
def test_round_trip_bit_for_bit(tmp_path, shape):
    masks = random_masks([shape, (5, 3)], seed=sum(shape))
    path = tmp_path / "masks.safetensors"
    sha = save_masks(path, masks, transposed=[], pattern="unstructured")
    with safe_open(str(path), framework="pt") as fh:
        stored = fh.get_slice("m0.weight")
        assert stored.get_dtype() == "U8" and stored.get_shape() == [shape[0], (shape[1] + 7) // 8]
    loaded, meta = load_masks(path)
    assert meta["mask_format"] == "packed-bits-v1" and json.loads(meta["shapes"])["m0.weight"] == list(shape)
    assert list(loaded) == sorted(masks)
    for key, keep in masks.items():
        got = loaded[key]
        assert got.dtype == torch.bool and got.shape == keep.shape and torch.equal(got, keep)
    assert sha == masks_sha256(masks) == masks_sha256(loaded) == first_release_sha256(masks)


def test_bit_order_is_little_endian_within_a_byte():
    keep = torch.zeros(2, 11, dtype=torch.bool)
    keep[0, 0] = keep[0, 9] = True  # entry 0 -> bit 0 of byte 0; entry 9 -> bit 1 of byte 1
    keep[1, 7] = keep[1, 10] = True  # entry 7 -> bit 7 of byte 0; entry 10 -> bit 2 of byte 1
    assert pack_mask(keep).tolist() == [[1, 2], [128, 4]]
    mask = random_masks([(6, 21)])["m0.weight"]
    padded = torch.zeros(6, 24, dtype=torch.uint8)
    padded[:, :21] = mask
    expected = (padded.view(6, 3, 8) * (2 ** torch.arange(8))).sum(-1)  # the format, restated in torch
    assert torch.equal(pack_mask(mask), expected.to(torch.uint8))
    assert torch.equal(unpack_mask(pack_mask(mask), 21), mask)


def test_packed_file_is_an_eighth_of_the_bool_file(tmp_path):
    masks = random_masks([(512, 4096), (1536, 576)])
    save_bool(tmp_path / "bool.safetensors", masks)
    save_masks(tmp_path / "packed.safetensors", masks, transposed=[], pattern="unstructured")
    ratio = (tmp_path / "packed.safetensors").stat().st_size / (tmp_path / "bool.safetensors").stat().st_size
    assert ratio <= 0.13, ratio


def first_release_file(folder: Path) -> Path:
    """The masks.safetensors of the first release, rebuilt byte for byte from its text description
    (bool tensors in the stored 0/1 rows, the stored metadata): no binary file in git."""
    from safetensors.torch import save_file

    spec = json.loads(FIXTURE.read_text())
    tensors = {name: torch.tensor([[c == "1" for c in row] for row in t["rows"]], dtype=torch.bool).reshape(t["shape"])
               for name, t in spec["tensors"].items()}
    path = folder / "masks_bool_v1.safetensors"
    save_file(tensors, str(path), metadata=spec["metadata"])
    return path


def test_first_release_fixture_reads_and_keeps_its_hash(tmp_path):
    masks, meta = load_masks(first_release_file(tmp_path))
    assert "mask_format" not in meta and json.loads(meta["transposed"]) == ["transformer.h.0.attn.c_attn.weight"]
    expected = fixture_masks()
    assert sorted(masks) == sorted(expected) and len(masks) == 4
    for key, keep in masks.items():
        assert keep.dtype == torch.bool and torch.equal(keep, expected[key])
    assert masks_sha256(masks) == masks_sha256(expected) == FIXTURE_SHA256
    # a stage that re-commits masks read from an old stage writes them packed, with the same hash
    assert save_masks(tmp_path / "m.safetensors", masks, transposed=["transformer.h.0.attn.c_attn.weight"],
                      pattern="unstructured") == FIXTURE_SHA256
    again, meta2 = load_masks(tmp_path / "m.safetensors")
    assert meta2["mask_format"] == "packed-bits-v1" and meta2["transposed"] == meta["transposed"]
    assert all(torch.equal(again[k], expected[k]) for k in expected)
    assert masks_sha256(again) == FIXTURE_SHA256


def test_mapping_behaves_like_the_dict_it_replaces(tmp_path):
    masks = random_masks([(4, 9), (3, 16), (2, 2)])
    save_masks(tmp_path / "m.safetensors", masks, transposed=[], pattern="unstructured")
    loaded, _ = load_masks(tmp_path / "m.safetensors")
    assert len(loaded) == 3 and "m1.weight" in loaded and "nope" not in loaded
    assert loaded.keys() == masks.keys() and set(loaded) == set(masks)
    assert loaded.get("nope") is None and torch.equal(loaded.get("m2.weight"), masks["m2.weight"])
    assert all(torch.equal(v, masks[k]) for k, v in zip(loaded.keys(), loaded.values()))
    plain = dict(loaded)
    assert type(plain) is dict and all(torch.equal(plain[k], masks[k]) for k in masks)
    assert loaded.shapes == {k: tuple(v.shape) for k, v in masks.items()}
    with pytest.raises(KeyError):
        loaded["nope"]
    with pytest.raises(TypeError):
        loaded["m0.weight"] = masks["m0.weight"]  # read-only


@pytest.mark.parametrize("fmt", ["packed", "bool"])
def test_masks_are_read_when_accessed_and_never_kept(tmp_path, monkeypatch, fmt):
    masks = random_masks([(8, 13)] * 5)
    path = tmp_path / "m.safetensors"
    save_masks(path, masks, transposed=[], pattern="unstructured") if fmt == "packed" else save_bool(path, masks)
    reads = []
    real_open = mask_io.open_safetensors
    monkeypatch.setattr(mask_io, "open_safetensors", lambda *a, **k: reads.append(1) or real_open(*a, **k))
    loaded, _ = load_masks(path)
    reads.clear()
    assert len(loaded) == 5 and "m3.weight" in loaded and list(loaded.keys()) == sorted(masks)
    assert loaded.shapes["m0.weight"] == (8, 13) and not reads  # names and shapes come from the header
    first, second = loaded["m0.weight"], loaded["m0.weight"]
    assert first is not second and torch.equal(first, second) and len(reads) == 2  # equal, but new
    first.logical_not_()  # a caller's change stays its own
    assert torch.equal(loaded["m0.weight"], masks["m0.weight"])
    del first, second
    reads.clear()
    seen = []
    for key, keep in loaded.items():  # one unpacked mask alive at a time, one opening of the file
        assert torch.equal(keep, masks[key])
        seen.append(weakref.ref(keep))
        gc.collect()
        assert sum(ref() is not None for ref in seen) == 1
    assert len(reads) == 1 and len(seen) == 5
    del keep
    seen.clear()
    for keep in loaded.values():
        seen.append(weakref.ref(keep))
        gc.collect()
        assert sum(ref() is not None for ref in seen) == 1
    assert len(seen) == 5 and masks_sha256(loaded) == masks_sha256(masks)


def _packed(tmp_path):
    path = tmp_path / "masks.safetensors"
    save_masks(path, fixture_masks(), transposed=[], pattern="unstructured")
    return path


def _one_line_error(path, match):
    with pytest.raises(RunDirError, match=match) as err:
        masks, _ = load_masks(path)
        for _ in masks.values():
            pass
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"masks {path}: ") and err.value.exit_code == 5
    return message


def _shapes_with(**changes):
    shapes = {k: list(v) for k, v in FIXTURE_SHAPES.items()}
    shapes.update(changes)
    return json.dumps({k: v for k, v in shapes.items() if v is not None})


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("shapes, match", [
    (_shapes_with(**{Q: [8, 17]}), rf"packed mask {Q} is stored as \[8, 2\] bytes, which does not fit its metadata "
                                   r"shape \[8, 17\] \(needs \[8, 3\]\)"),
    (_shapes_with(**{Q: [9, 13]}), rf"packed mask {Q} is stored as \[8, 2\] bytes"),
    (_shapes_with(**{Q: None}), f"packed mask {Q} has no shape in the 'shapes' metadata"),
    (_shapes_with(**{Q: [8, "13"]}), rf"packed mask {Q} has shape \[8, \"13\"\] in the metadata"),
    (_shapes_with(**{Q: []}), rf"packed mask {Q} has shape \[\] in the metadata"),
    (_shapes_with(**{"ghost.weight": [2, 2]}), "the 'shapes' metadata names ghost.weight"),
    ("{not json", "its 'shapes' metadata is not a JSON object"),
    ("[[8, 13]]", "its 'shapes' metadata is not a JSON object"),
])
def test_bad_packed_metadata_is_one_line(tmp_path, shapes, match):
    path = _packed(tmp_path)
    rewrite(path, meta={"shapes": shapes})
    _one_line_error(path, match)


def test_other_damage_is_one_line(tmp_path):
    path = _packed(tmp_path)
    rewrite(path, meta={"shapes": None})
    _one_line_error(path, "its masks are packed \\(packed-bits-v1\\) but it has no 'shapes' metadata")
    path = _packed(tmp_path)
    rewrite(path, tensors={Q: torch.zeros(8, 2, dtype=torch.int16)})
    _one_line_error(path, f"packed mask {Q} is stored as I16, not uint8 bits")
    path = _packed(tmp_path)
    rewrite(path, tensors={Q: torch.full((8, 2), 0xFF, dtype=torch.uint8)})  # bits 13..15 of each row set
    _one_line_error(path, f"packed mask {Q} has bits set past its width 13")
    path = _packed(tmp_path)
    rewrite(path, meta={"mask_format": "packed-bits-v9"})
    _one_line_error(path, "unknown mask_format 'packed-bits-v9'")
    path = _packed(tmp_path)
    rewrite(path, meta={"transposed": "{}"})
    _one_line_error(path, "its 'transposed' metadata is not a JSON list")
    path = tmp_path / "bool.safetensors"
    save_bool(path, {"w": torch.ones(2, 3, dtype=torch.bool), "v": torch.ones(2, 3, dtype=torch.uint8)})
    _one_line_error(path, "v is uint8, not a boolean mask")
